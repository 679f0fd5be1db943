"""The method spec and the data spec: what the layers above the losses know of a method.

Each `fvfunc/losses/<method>.py` exports one `SPEC = MethodSpec(...)`; the command line, the run-file
reader, validation and the trainer read specs, never method names. A method itself is `Method(init,
step)`, like an optax transformation: `init(params, key) -> TrainState` and `step(state, batch) ->
(state, metrics)`, pure in the sense that matters for a trainer (inputs are never modified; randomness
comes from `fold_in(state.key, state.step)`), so resuming from a saved state is exact by construction.

The data spec is the tuple of `Column`s a run reads from its dataset. A FastVideo schema (t2v,
text-only, i2v, ode_trajectory_text_only) is a set of columns, not a code path: the reader decodes
exactly the columns asked for, and a file without one is an error naming the column and the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from fvfunc.state import TrainState


class BatchError(ValueError):
    """A batch a method cannot use (e.g. a trajectory whose states and timesteps disagree); the message
    names the samples' ids."""


class Column(NamedTuple):
    """One tensor column of a FastVideo parquet file: `<name>_bytes`, `<name>_shape`, `<name>_dtype`."""

    name: str
    """The column triplet's prefix in the file."""
    key: str
    """Its key in a batch."""
    rank: int
    """Rank of one row's tensor (one more, with a leading 1, is accepted)."""
    kind: str
    """'text' (zero-padded to data.text_len, with its length in batch['text_len']), 'latents' (normalised
    per channel, dim -4, with the VAE's latents mean / std), 'tensor' (as stored) or 'condition' (as
    stored, and handed to the models as their image condition: `condition(batch)`)."""
    what: str
    """What it holds, for error messages."""


TEXT = Column("text_embedding", "text", 2, "text", "the text embeddings")
LATENTS = Column("vae_latent", "latents", 4, "latents", "the VAE latents")
TRAJECTORY = Column("trajectory_latents", "trajectory", 5, "tensor",
                    "the teacher's ODE trajectory")  # states in the model's latent space, used as stored
TRAJECTORY_TIMESTEPS = Column("trajectory_timesteps", "trajectory_timesteps", 1, "tensor",
                              "the trajectory's timesteps")

CLIP_FEATURE = Column("clip_feature", "clip_feature", 2, "condition", "the CLIP image tokens")
FIRST_FRAME_LATENT = Column("first_frame_latent", "first_frame_latent", 4, "condition",
                            "the normalised VAE latent of the first frame followed by zero frames")
CONDITIONS = {c.name: c for c in (CLIP_FEATURE, FIRST_FRAME_LATENT)}
"""FastVideo's i2v columns a family's `conditions` may name (fvfunc.models.Family.conditions)."""

DataSpec = tuple[Column, ...]


def condition(batch: dict) -> dict:
    """The image condition of a batch ({} for text-only data): its condition columns by name."""
    return {c.name: batch[c.key] for c in CONDITIONS.values() if c.key in batch}


def conditioned(cond: dict | None) -> tuple:
    """The trailing argument of a role's apply for an image condition: (cond,), or () without one (so a
    text-only apply keeps its four arguments)."""
    return (cond,) if cond else ()


class Method(NamedTuple):
    init: Callable[[dict, Any], TrainState]
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]


class FastVideoKeys(NamedTuple):
    """The FastVideo run-file keys a method reads besides the shared ones (fvfunc/config_file.py), each
    with its type, and `read(sections, put, facts)` that sets fvfunc fields from them:
    sections = {"training": {...}, "method_config": {...}, "pipeline_config": {...}} as decoded (keys
    absent from the file are absent), `put(target, key, value, weak=False)` sets field `target`
    ("method.flow_shift") from the file key `key` ("pipeline_config.flow_shift"; a weak value is a
    default that never overrides), facts = config_file.FileFacts (the file's layout, the family's VAE
    compression, FastVideo's formats and defaults)."""

    training: dict[str, Any] = {}
    method_config: dict[str, Any] = {}
    """(A method_config key that is also an fvfunc field name, listed here, is the spec's to read: e.g.
    a value FastVideo writes in another form.)"""
    pipeline_config: dict[str, Any] = {}
    read: Callable[[dict, Callable, Any], None] = lambda sections, put, facts: None
    target: str = ""
    """The class name of this method in FastVideo's fastvideo/train files (`method._target_`)."""


class MethodSpec(NamedTuple):
    """A training method as the layers above the losses see it."""

    name: str
    """The subcommand: `python train.py <name>`."""
    run: type
    """The run config dataclass (configs.py); its `method` field holds the method's own config."""
    roles: Callable[[Any], tuple[str, ...]]
    """roles(run) -> the roles this run needs (a method may need a role only in some modes)."""
    trainable: tuple[str, ...]
    """The roles it updates (each gets an optimizer, checkpoints, optionally an EMA)."""
    data: Callable[[Any], DataSpec]
    """data(run) -> the columns this run reads from data.path."""
    check: Callable[[Any], None]
    """check(run) raises ValueError naming the field ('method.critic_lr must be > 0, got 0') for a
    method config that cannot work; called before any model loads."""
    sampler: Callable[[Any], Any]
    """sampler(run) -> the validation sampler (configs.SamplerConfig), the run's with the method's own
    defaults filled in (e.g. DMD2's step list)."""
    make: Callable[..., Method]
    """make(run, roles, reduce) -> Method; roles: {name: fvfunc.roles.Role}; reduce averages gradients
    over data-parallel ranks (None for one process)."""
    fastvideo: FastVideoKeys = FastVideoKeys()
    prepare: Callable[..., Any] | None = None
    """prepare(run, roles, io) -> Prepared or None: work done once before training (kd: generate the
    teacher's trajectories), before the method is made. io is a DataIO (infra the trainer lends)."""


class Prepared(NamedTuple):
    """What a method's `prepare` made: the data to train on, entries for every batch and the roles no
    longer needed."""

    paths: Any = None
    """Dataset folders (as data.path takes them); None keeps the run's dataset."""
    columns: DataSpec = ()
    """The columns to read from them."""
    release: tuple[str, ...] = ()
    """Roles the trainer may free now (e.g. a teacher that only made the data)."""
    batch: dict[str, Any] = {}
    """Tensors [1, ...] the trainer adds to every batch, repeated per sample (e.g. "negative_text",
    the negative prompt's embedding [1, L, D])."""


class DataIO(NamedTuple):
    """The infra a method's `prepare` may use, lent by the trainer (losses import no infra)."""

    open: Callable[..., Any]
    """open(path, columns) -> a dataset (`len(ds)`, `ds.batch(indices)` -> batch dict with 'ids', 'captions')."""
    write: Callable[..., Any]
    """write(path, rows): rows of {'id', 'caption', <column key>: tensor, ...} as one parquet file,
    atomically (a temporary name, renamed when complete)."""
    finished: Callable[[Any], set[str]]
    """finished(folder) -> the ids already in the complete parquet files of folder."""
    progress: Callable[..., Any]
    """progress(total, initial, desc) -> a progress bar with update(n) and close()."""
    rank: int
    world_size: int
    barrier: Callable[[], None]
    device: Any
    negative: Callable[..., Any] = lambda prompt, embedding_file, folder, field: None
    """negative(prompt, embedding_file, folder, field) -> the negative prompt's embedding [1, L, D] on
    `device` (the file's, or the prompt encoded with the umT5 of the role folder `folder`), or None
    for zero text (with a warning); errors name `field` ("method.negative_prompt")."""
    conditions: DataSpec = ()
    """The image-condition columns of the run's data that its student's family takes (CLIP_FEATURE,
    FIRST_FRAME_LATENT; none for a text-to-video student): what a generated dataset must carry too."""
