"""The train state of every method, and its round trip to the plain tensor trees a checkpoint holds.

`to_trees` / `from_trees` are pure: what a checkpoint stores is named trees of tensors
({"student": params, "student.opt.mu": ..., "student.ema": ..., "state": {"key"}}); how a saved tensor
is laid out on this rank (device, sharding) is the caller's `place(template, saved) -> tensor`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from fvfunc import experts, optim

Params = dict[str, torch.Tensor]


class TrainState(NamedTuple):
    step: int
    """Steps taken (the next step's number)."""
    key: torch.Tensor
    """The run's step key; step s draws from fold_in(key, s)."""
    params: dict[str, Params]
    """Every role's params, frozen ones included."""
    opt: dict[str, optim.AdamWState | dict[str, optim.AdamWState]]
    """Optimizer state of each trainable role ({expert: state} for an expert pair, fvfunc/experts.py)."""
    ema: dict[str, Params]
    """EMA of the params of each role that keeps one (roles.<role>.ema_decay > 0)."""


class StateError(ValueError):
    """Saved trees that do not fit the run's state; the message names the tree."""


def to_trees(state: TrainState, trainable) -> dict[str, Params]:
    trees = {"state": {"key": state.key}}
    for role in trainable:
        trees[role] = state.params[role]
        trees[f"{role}.opt"] = experts.state_to_tree(state.opt[role])
    for role, ema in state.ema.items():
        trees[f"{role}.ema"] = ema
    return trees


def _placed(template: Params, saved: Params, place: Callable, where: str) -> Params:
    if saved.keys() != template.keys():
        diff = sorted(saved.keys() ^ template.keys())[:3]
        raise StateError(f"{where} does not match the model (differences: {diff})")
    try:
        return {k: place(template[k], v) for k, v in saved.items()}
    except ValueError as e:
        raise StateError(f"{where}: {e}") from None


def _opt_placed(template, saved, place: Callable, where: str):
    if isinstance(template, optim.AdamWState):
        return optim.AdamWState(saved.step, _placed(template.mu, saved.mu, place, where),
                                _placed(template.nu, saved.nu, place, where))
    return {n: _opt_placed(template[n], saved[n], place, f"{where} of expert {n!r}") for n in template}


def from_trees(state: TrainState, trees: dict[str, Params], step: int, trainable, place: Callable) -> TrainState:
    """`state` with the trainable roles, optimizer states, EMAs, key and step of saved trees."""
    params, opt, ema = dict(state.params), dict(state.opt), {}
    for role in trainable:
        if role not in trees or f"{role}.opt" not in trees:
            raise StateError(f"no '{role}' params or optimizer state saved")
        params[role] = _placed(params[role], trees[role], place, f"'{role}' params")
        try:
            saved = experts.state_from_tree(trees[f"{role}.opt"], state.opt[role])
        except KeyError as e:
            raise StateError(f"'{role}' optimizer state: {e}") from None
        opt[role] = _opt_placed(state.opt[role], saved, place, f"'{role}' optimizer state")
    for role, template in state.ema.items():
        if f"{role}.ema" not in trees:
            raise StateError(f"the run keeps an EMA of '{role}' but none is saved")
        ema[role] = _placed(template, trees[f"{role}.ema"], place, f"'{role}' EMA")
    return TrainState(int(step), trees["state"]["key"], params, opt, ema)
