"""Model families: each module holds a config type and load / save / init / apply.

A family module provides: `config_from_dict`, `load(path, dtype=None, device=None, rows=None) -> (cfg,
params)` (rows: read only those rows of dim 0, one rank's piece), `load_config(path)`, `param_shapes(cfg)`,
`save(path, cfg, params)`, `init(cfg, key)`, `apply(params, cfg, x, t, context, *, dtype, attention,
remat, remat_fraction, compile, gather)`, `latent_channels(cfg)`, `patch_size(cfg)`, `ModelError`.
Adding a family is one module plus one line below.
"""

from __future__ import annotations

from types import ModuleType

from fvfunc.models import wan

FAMILIES: dict[str, ModuleType] = {"wan": wan}


def family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]
