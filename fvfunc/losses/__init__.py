"""Training methods: one module per method, each with its pure losses, its `make(run, roles, reduce) ->
Method(init, step)` and one `SPEC` (fvfunc/losses/spec.py) that the layers above read. Adding a method is
one module plus its name in MODULES (its run config lives in configs.py)."""

from __future__ import annotations

import importlib

from fvfunc.losses.spec import MethodSpec

MODULES = ("flow_matching", "dmd2", "kd")
"""The method modules of fvfunc/losses/, in the order `train.py --help` lists them."""

METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (importlib.import_module(f"fvfunc.losses.{m}").SPEC for m in MODULES)}
"""Method name (the subcommand) -> its spec."""
