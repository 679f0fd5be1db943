"""Multi-process training on torch.distributed (launched by torchrun): data parallel and sharded params.

One process a GPU (NCCL), or a few CPU processes (gloo, for tests). `init(device)` reads torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or takes a process group the caller has
already started; a lone process gets `Process(0, 1, device, None)` and nothing here communicates.

Data parallel. Every rank reads its own slice of the global batch (`data.Loader(rank, world_size)`),
draws each sample's noise from the sample's global index, and averages its gradient with the others
(`make_reduce`, the `reduce` hook of `fvfunc.optim.apply_gradients`) before clipping and AdamW. With
equal slices the mean over ranks of per-rank means is the global mean, so W ranks over a global batch
take the step one process takes over the same batch (tests/test_distributed.py).

Sharded params (ZeRO-3 / FSDP style). A sharded role keeps its params dict and its keys; each leaf is a
DTensor sharded on dim 0 over a 1-D DeviceMesh, split as `torch.chunk` splits (rank r holds rows
[r c, (r + 1) c) with c = ceil(n / W), maybe none). Gradients, AdamW moments and the EMA come out as
DTensors of the same layout, so the elementwise AdamW and the global-norm clip (DTensor reduces the
partial norms) run unchanged on the local pieces: optimizer state is sharded for free. The model's
apply calls `gather(tree)` right before it uses a unit (each transformer block, and the params outside
the blocks): one `all_gather_into_tensor` of the unit's flattened pieces, whose backward
is one `reduce_scatter_tensor` (a sum over ranks; `make_reduce` then divides by W). Gathering inside
the block means remat (activation checkpointing) frees a block's gathered weights after its forward
and gathers them again for the backward, so only one block is whole at a time.

Overlapped communication (`overlap=True`, training.overlap_comm). `prefetch(unit)` starts a unit's
all-gather without waiting for it, and `gather(unit, fetched)` waits for it when the unit runs: the block
runner starts block i + 1's gather before block i computes, and, when a block is recomputed in the
backward pass, the gather of the block recomputed next (fvfunc/runner.py). The backward's
reduce-scatter returns at once: its result is an AsyncCollectiveTensor (torch's functional collectives)
that waits the first time anything reads it (the engine's accumulation, `make_reduce`, the clip), so the
reduce-scatter of block i runs while block i - 1's backward computes; block i - 1's reduce-scatter first
waits for block i's (one in flight, so one block's whole gradient is alive beside the one computing),
and the last one is waited for as the backward pass ends.

Sequence parallelism (Ulysses; Jacobs et al. 2023, "DeepSpeed Ulysses", arXiv:2309.14509). With
training.sp_size = S the W ranks are a 2-D mesh (W / S data-parallel groups) x (S sequence ranks): the
ranks r with the same r // S share their samples, and each holds 1 / S of every sample's tokens between
the embedding and the head (`Sequence`, what the block runner is given). Around self-attention one
all-to-all turns the token shards of q, k, v (all heads) into every token of H / S heads and one turns
the output back; cross-attention and the FFN stay on the local tokens; the head gathers the tokens. The
collectives are differentiable (the all-to-all's adjoint is the inverse all-to-all, the all-gather's a
reduce-scatter that sums), so each rank's loss is the whole sample's and the S ranks' gradients sum to S
times the sample's gradient, blocks and embeddings alike: `make_reduce`'s sum over all W ranks / W is the
data-parallel mean. Sharded roles are split over all W ranks (ZeRO-3 over the whole mesh).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fcol
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

Params = dict[str, torch.Tensor]
SHARDINGS = ("replicated", "sharded")
BUCKET_BYTES = 256 * 2**20
"""All-reduce gradients in flat buckets of about this size (few large collectives, bounded extra memory)."""


class Process(NamedTuple):
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None
    """The 1-D mesh of all ranks, None in a lone process."""
    owner: bool
    """Whether `init` started the process group (and `shutdown` ends it)."""
    sp: Sequence | None = None
    """This rank's sequence-parallel group (training.sp_size > 1), None without sequence parallelism."""
    sp_size: int = 1
    """Ranks that share each sample's tokens (training.sp_size as asked; `init` builds the group only
    when it divides the world size, and the trainer refuses it otherwise)."""

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: the ranks of one sequence group read the same samples."""
        return self.rank // self.sp_size if self.world_size % self.sp_size == 0 else self.rank

    @property
    def dp_size(self) -> int:
        """Data-parallel groups (the world size / sp_size)."""
        return self.world_size // self.sp_size if self.world_size % self.sp_size == 0 else self.world_size


# (torch 2.13's names; torch 2.11 has only the older ones, which 2.13 deprecates)
_gather_autograd = getattr(fcol, "all_gather_single_autograd", None) or fcol.all_gather_tensor_autograd


class Sequence(NamedTuple):
    """One sequence-parallel group: `size` ranks each holding the tokens [rank n, (rank + 1) n) of a sample
    of N = size n tokens. What the block runner needs of it: `to_heads` / `to_sequence` around
    self-attention and `gather` before the head (each differentiable; see the module docstring)."""

    group: dist.ProcessGroup
    size: int
    rank: int
    """This rank's place in the group (its token shard)."""

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n, H, Dh] (this rank's tokens, every head) -> [..., N, H / size, Dh] (every token of this
        rank's heads, rank r taking heads [r H / size, (r + 1) H / size)): one all-to-all."""
        *lead, n, heads, dh = x.shape
        if heads % self.size:
            raise ValueError(f"training.sp_size {self.size} must divide the attention heads ({heads})")
        x = x.reshape(*lead, n, self.size, heads // self.size, dh).movedim(-3, 0).contiguous()
        x = fcol.all_to_all_single_autograd(x, None, None, self.group)  # dim 0: the source rank's tokens
        return x.movedim(0, -4).reshape(*lead, self.size * n, heads // self.size, dh)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_heads`: [..., N, H / size, Dh] -> [..., n, H, Dh]."""
        *lead, tokens, heads, dh = x.shape
        x = x.reshape(*lead, self.size, tokens // self.size, heads, dh).movedim(-4, 0).contiguous()
        x = fcol.all_to_all_single_autograd(x, None, None, self.group)  # dim 0: the source rank's heads
        return x.movedim(0, -3).reshape(*lead, tokens // self.size, self.size * heads, dh)

    def gather(self, h: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's token shard along `dim`, in rank order (all-gather; its backward sums the
        gradients over the group's ranks and keeps this rank's rows)."""
        out = _gather_autograd(h.movedim(dim, 0).contiguous(), 0, self.group)
        return fcol.wait_tensor(out).movedim(0, dim)


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # one GPU a process: torchrun's LOCAL_RANK picks it
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init(device: str = "auto", sp_size: int = 1) -> Process:
    """This process's place in the run; starts the process group under torchrun (WORLD_SIZE > 1),
    NCCL when the device is a GPU, else gloo. `device` is TrainingConfig.device ('auto' and 'cuda' mean
    cuda:LOCAL_RANK). sp_size > 1: the ranks also form a (W / sp_size) x sp_size mesh ("dp", "sp") of
    consecutive ranks a sequence group (one node's GPUs, for the all-to-alls)."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Process(0, 1, _device(device, 0), None, False, None, sp_size)
    dev = _device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owner = not dist.is_initialized()
    if owner:
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(dev.type, (world,)) if world > 1 else None
    sp = None
    if sp_size > 1 and world % sp_size == 0:
        grid = init_device_mesh(dev.type, (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
        sp = Sequence(grid["sp"].get_group(), sp_size, rank % sp_size)
    return Process(rank, world, dev, mesh, owner, sp, sp_size)


def shutdown(process: Process, clean: bool = True) -> None:
    """End the process group if `init` started it. `clean`: every rank got here normally, so wait for
    all of them first (a rank that tears gloo down while a peer still talks to it can abort); after an
    error, other ranks may never arrive, so don't."""
    if process.owner and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def barrier(process: Process) -> None:
    if process.world_size > 1:
        dist.barrier()


def exchange(process: Process) -> Callable[[object], list] | None:
    """`sync(obj) -> [obj of rank 0, obj of rank 1, ...]` (an all-gather that doubles as a barrier), or
    None in a lone process: what `checkpoint.save` needs to write one checkpoint from many ranks."""
    if process.world_size == 1:
        return None

    def sync(obj):
        out = [None] * process.world_size
        dist.all_gather_object(out, obj)
        return out

    return sync


# ------------------------------------------------------------------------ gradients and metrics


def _buckets(keys: list[str], tensors: Params, limit: int) -> list[list[str]]:
    """Consecutive keys grouped by (dtype, device), each group up to `limit` bytes (at least one key)."""
    groups: dict[tuple, list[list[str]]] = {}
    for k in keys:
        t = tensors[k]
        runs = groups.setdefault((t.dtype, t.device), [[]])
        size = sum(tensors[j].numel() * tensors[j].element_size() for j in runs[-1])
        if runs[-1] and size + t.numel() * t.element_size() > limit:
            runs.append([])
        runs[-1].append(k)
    return [run for runs in groups.values() for run in runs if run]


def make_reduce(process: Process, bucket_bytes: int = BUCKET_BYTES) -> Callable[[Params], Params] | None:
    """The mean of a gradient tree over ranks (None in a lone process). Replicated leaves: flat bucketed
    all-reduces (sum, then / W). Sharded leaves (DTensors): `gather`'s backward already summed them over
    ranks with its reduce-scatter, so they are only divided by W. Under sequence parallelism the S ranks
    of a group sum to S times their sample's gradient (module docstring), so the same sum / W is the
    data-parallel mean."""
    if process.world_size == 1:
        return None
    world = process.world_size

    def reduce(grads: Params) -> Params:
        out = dict(grads)
        sharded = [k for k, g in grads.items() if isinstance(g, DTensor)]
        if sharded:
            out.update(zip(sharded, torch._foreach_div([grads[k] for k in sharded], world), strict=True))
        plain = [k for k, g in grads.items() if not isinstance(g, DTensor)]
        pending = []
        for keys in _buckets(plain, grads, bucket_bytes):
            flat = torch.cat([grads[k].reshape(-1) for k in keys])
            pending.append((keys, flat, dist.all_reduce(flat, async_op=True)))
        for keys, flat, work in pending:
            work.wait()
            flat.div_(world)
            pieces = flat.split([grads[k].numel() for k in keys])
            out.update({k: p.view_as(grads[k]) for k, p in zip(keys, pieces, strict=True)})
        return out

    return reduce


def mean_over_ranks(process: Process, values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over ranks (one all-reduce); a lone process gets its values back."""
    if process.world_size == 1 or not values:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=process.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / process.world_size).tolist(), strict=True))


def scalar(v) -> float:
    """A metric as a float; a DTensor (e.g. a sharded role's grad norm) is made whole first."""
    if isinstance(v, DTensor):
        v = v.full_tensor()
    return float(v)


# ------------------------------------------------------------------------------------- sharding


def _rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 that `rank` holds: torch.chunk's split, as DTensor's Shard(0) makes it."""
    c = -(-n // world)
    return min(rank * c, n), min((rank + 1) * c, n)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def rows_of(process: Process) -> Callable[[int], tuple[int, int]]:
    """n -> the rows [start, stop) of a dim 0 of size n that this rank holds once sharded."""
    return lambda n: _rows(n, process.world_size, process.rank)


def from_rows(local: torch.Tensor, shape: tuple[int, ...], mesh: DeviceMesh, device=None) -> torch.Tensor:
    """A Shard(0) DTensor of global `shape` from this rank's rows `local` (as `rows_of` picks them),
    moved to `device`; a 0-d tensor stays whole."""
    if local.ndim == 0:
        return local.to(device)
    local = local.to(device, copy=True).contiguous()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def shard_tensor(t: torch.Tensor, mesh: DeviceMesh, device=None) -> torch.Tensor:
    """This rank's rows of a whole tensor, as a Shard(0) DTensor on `device`; 0-d tensors stay whole."""
    if t.ndim == 0:
        return t.to(device)
    start, stop = _rows(t.shape[0], mesh.size(), mesh.get_local_rank())
    return from_rows(t[start:stop], t.shape, mesh, device)


def shard(params: Params, mesh: DeviceMesh, device=None) -> Params:
    """A params dict with every leaf sharded (same keys, same global shapes)."""
    return {k: shard_tensor(v, mesh, device) for k, v in params.items()}


def is_sharded(tree: Params) -> bool:
    return any(isinstance(v, DTensor) for v in tree.values())


def like(template: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` laid out as `template`: for a DTensor template, `value` is either the whole tensor (then
    sliced) or this rank's piece (then wrapped); otherwise `value` on the template's device."""
    if not isinstance(template, DTensor):
        if value.shape != template.shape:
            raise ValueError(f"shape {list(value.shape)}, expected {list(template.shape)}")
        return value.to(template.device)
    local = template.to_local()
    if value.shape == template.shape:
        return shard_tensor(value, template.device_mesh, local.device).to(template.dtype)
    if value.shape != local.shape:
        raise ValueError(f"shape {list(value.shape)} is neither the whole {list(template.shape)} nor this "
                         f"rank's piece {list(local.shape)}")
    value = value.to(local.device, template.dtype)
    return DTensor.from_local(value, template.device_mesh, template.placements,
                              run_check=False, shape=template.shape, stride=template.stride())


def pieces(trees: dict[str, Params]) -> tuple[dict[str, Params], dict[str, Params]]:
    """(the leaves every rank holds alike, this rank's pieces of the sharded leaves) of each tree: what
    rank 0 writes once and what every rank writes as its shard of a checkpoint."""
    whole, local = {}, {}
    for name, tree in trees.items():
        w = {k: v for k, v in tree.items() if not isinstance(v, DTensor)}
        s = {k: v.to_local() for k, v in tree.items() if isinstance(v, DTensor)}
        if w:
            whole[name] = w
        if s:
            local[name] = s
    return whole, local


class _Layout(NamedTuple):
    group: dist.ProcessGroup
    world: int
    shapes: tuple[torch.Size, ...]
    """Whole shapes."""
    sizes: tuple[int, ...]
    """Elements of one rank's padded piece, ceil(n0 / W) * row."""
    overlap: bool = False
    """Whether the backward's reduce-scatter returns before it is done (an AsyncCollectiveTensor)."""


# torch 2.13 renamed the flat collectives (the old names warn); torch 2.11 has only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_reduce_scatter_async = getattr(fcol, "reduce_scatter_single", None) or fcol.reduce_scatter_tensor


def _pad(flat: torch.Tensor, n: int) -> torch.Tensor:
    return flat if flat.numel() == n else torch.cat([flat, flat.new_zeros(n - flat.numel())])


def _flat(layout: _Layout, local) -> torch.Tensor:
    """A unit's local pieces as one flat buffer, each padded to its piece size."""
    return torch.cat([_pad(p.reshape(-1), n) for p, n in zip(local, layout.sizes, strict=True)])


class _Fetch:
    """An all-gather started ahead of its unit (`prefetch`): its output buffer and its pending work."""

    def __init__(self, layout: _Layout, local):
        flat = _flat(layout, local)
        self.out = flat.new_empty(layout.world * flat.numel())
        self.work = _all_gather(self.out, flat, group=layout.group, async_op=True)

    def wait(self) -> torch.Tensor:
        with torch.profiler.record_function("fvfunc::wait"):  # (a name for bench/multi_gpu.py's profile)
            self.work.wait()
        return self.out


_IN_FLIGHT: list[torch.Tensor] = []
"""The overlapped reduce-scatter still running, at most one: until it is waited for, its input (the unit's
whole gradient) stays alive, so letting every block's run on to the end of the backward pass would hold
the whole model's gradients at once."""


def _drain() -> None:
    while _IN_FLIGHT:
        t = _IN_FLIGHT.pop()
        t.trigger_wait() if isinstance(t, fcol.AsyncCollectiveTensor) else fcol.wait_tensor(t)


class _Gather(torch.autograd.Function):
    """Whole tensors from the local pieces of a unit (one all-gather, or one started earlier: `fetched`);
    backward: one reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, layout: _Layout, fetched: _Fetch | None, *local):
        ctx.layout, ctx.rows = layout, [p.shape[0] for p in local]
        ctx.dtype, ctx.device = local[0].dtype, local[0].device
        if fetched is not None:
            out = fetched.wait()
        else:
            flat = _flat(layout, local)
            out = flat.new_empty(layout.world * flat.numel())
            _all_gather(out, flat, group=layout.group)
        out = out.view(layout.world, -1)
        whole, offset = [], 0
        for shape, n in zip(layout.shapes, layout.sizes, strict=True):
            whole.append(out[:, offset:offset + n].reshape(-1)[:shape.numel()].view(shape))
            offset += n
        return tuple(whole)

    @staticmethod
    def backward(ctx, *grads):
        layout = ctx.layout
        parts = []
        for g, shape, n in zip(grads, layout.shapes, layout.sizes, strict=True):
            if g is None:  # a leaf the unit did not use
                g = torch.zeros(shape.numel(), dtype=ctx.dtype, device=ctx.device)
            g = g.reshape(-1)
            parts.append(_pad(g, layout.world * n).view(layout.world, n))
        flat = torch.cat(parts, dim=1)
        if layout.overlap:  # returns at once; whatever first reads a piece waits (views do not)
            _drain()  # the unit before's, which ran while this unit's backward computed
            out = _reduce_scatter_async(flat.view(-1), "sum", 0, layout.group)
            _IN_FLIGHT.append(out)
            torch.autograd.Variable._execution_engine.queue_callback(_drain)  # the last one, as the backward ends
        else:
            out = flat.new_empty(flat.shape[1])
            _reduce_scatter(out, flat.view(-1), group=layout.group)
        local, offset = [], 0
        for shape, n, rows in zip(layout.shapes, layout.sizes, ctx.rows, strict=True):
            local.append(out[offset:offset + rows * shape[1:].numel()].view(rows, *shape[1:]))
            offset += n
        return (None, None, *local)


def _units(params: Params, overlap: bool) -> list[tuple[list[str], _Layout]]:
    """The sharded leaves of a tree by dtype (one collective each), with their layout."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for k, v in params.items():
        if isinstance(v, DTensor):
            by_dtype.setdefault(v.dtype, []).append(k)
    out = []
    for keys in by_dtype.values():
        mesh = params[keys[0]].device_mesh
        world, shapes = mesh.size(), tuple(params[k].shape for k in keys)
        sizes = tuple(-(-s[0] // world) * s[1:].numel() for s in shapes)
        out.append((keys, _Layout(mesh.get_group(), world, shapes, sizes, overlap)))
    return out


def prefetch(params: Params) -> list[_Fetch] | None:
    """Start the all-gathers of a tree's sharded leaves without waiting for them (None when none is
    sharded); `gather(params, fetched)` waits and makes them whole. Every rank must start the same units
    in the same order."""
    units = _units(params, True)
    if not units:
        return None
    with torch.no_grad():
        return [_Fetch(layout, [params[k].to_local() for k in keys]) for keys, layout in units]


def gather(params: Params, fetched: list[_Fetch] | None = None, overlap: bool = False) -> Params:
    """The same tree with every sharded leaf whole, differentiable: one all-gather a dtype (or the ones
    `prefetch(params)` started, `fetched`), and in the backward one reduce-scatter that sums the
    gradients over ranks into the local pieces (`overlap`: without waiting for it, see the module
    docstring). Leaves that are not sharded come back as they are. A pure function of the params
    (their mesh included)."""
    out = {k: v for k, v in params.items() if not isinstance(v, DTensor)}
    units = _units(params, overlap)
    if fetched is not None and len(fetched) != len(units):
        raise ValueError(f"gather: {len(fetched)} prefetched all-gathers for {len(units)} units")
    for i, (keys, layout) in enumerate(units):
        pending = None if fetched is None else fetched[i]
        out.update(zip(keys, _Gather.apply(layout, pending, *(params[k].to_local() for k in keys)), strict=True))
    return {k: out[k] for k in params}


@torch.no_grad()
def whole(params: Params, device=None, bucket_bytes: int = BUCKET_BYTES) -> Params:
    """Every leaf whole, gathered a bucket at a time onto `device` (default: where it is), for export
    and validation. Every rank must call it: it communicates when params are sharded."""
    out = {}
    for keys in _buckets(list(params), params, bucket_bytes):
        for k, v in gather({k: params[k] for k in keys}).items():
            out[k] = v.to(device) if device is not None else v
    return {k: out[k] for k in params}


def num_bytes(params: Params) -> int:
    """Bytes this rank holds for a params tree (local pieces of sharded leaves)."""
    return sum((v.to_local() if isinstance(v, DTensor) else v).nbytes for v in params.values())

