"""Training methods: one module per method, each with its pure losses and its `make(cfg, training,
models) -> Method(init, step)`, the roles it needs (ROLES), the roles it updates (TRAINABLE) and
`needs_latents(cfg)`. Adding a method is one module plus one line below (and its run config in
configs.RUNS)."""

from __future__ import annotations

from types import ModuleType

from fvfunc.losses import dmd2, flow_matching

METHODS: dict[str, ModuleType] = {"finetune": flow_matching, "dmd2": dmd2}
