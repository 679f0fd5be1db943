"""The order samples are read in: a seeded shuffle per epoch, and a loader that keeps it exactly.

- `epoch_order(n, seed, epoch, groups, window)`: the shuffle of one epoch, a pure function of its
  arguments: uniform over all samples, or row group by row group (`window` groups at a time).
- `Loader(dataset, batch_size, seed, position)`: batches forever, read by background threads in an
  order that depends only on (seed, position), so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fvfunc import random
from fvfunc.data.dataset import ParquetDataset
from fvfunc.data.parquet import DataError

SHUFFLES = ("auto", "rows", "groups")


def epoch_order(num_samples: int, seed: int | torch.Tensor, epoch: int, groups: torch.Tensor | None = None,
                window: int = 1) -> torch.Tensor:
    """The permutation of range(num_samples) used in `epoch`: a pure function of its arguments
    (`seed` an int or a key, e.g. the run's data key).

    Without `groups`, a uniform shuffle. With groups[i] = the row group (a dense id) of sample i, the
    row groups come in a shuffled order, `window` at a time, and the samples of each window are
    shuffled together: a group's rows are all read within one window, so each group is read once an
    epoch and a batch mixes the rows of up to `window` groups."""
    key = random.fold_in(random.key(seed) if isinstance(seed, int) else seed, epoch)
    if groups is None:
        return random.permutation(key, num_samples)
    n_groups = int(groups.max()) + 1
    place = torch.empty(n_groups, dtype=torch.long)  # each group's place in this epoch's group order
    place[random.permutation(random.fold_in(key, 0), n_groups)] = torch.arange(n_groups)
    window_of = torch.div(place[groups], window, rounding_mode="floor")
    # sort by window, then by a random permutation within: distinct integer keys, no ties
    return torch.argsort(window_of * num_samples + random.permutation(random.fold_in(key, 1), num_samples))


class Loader:
    """Batches of `dataset` forever, in the order of `epoch_order`, read ahead by `num_workers` threads.

    `seed` is an int or a key (the run's data key). A global batch is `batch_size * world_size` consecutive
    entries of the epoch's order; rank r takes slice r. `position` is (epoch, index) of the next batch, index
    being its offset in the epoch's order, so `Loader(..., position=saved)` continues the exact sequence (even
    with another batch size). With drop_last=False the epoch's last batch is filled up from the start of the
    same order, so every rank always gets a full batch. Batches come out in order whatever the threads do. A
    batch is `ParquetDataset.batch`'s dict: ids, captions and the dataset's columns.

    shuffle: "rows" (uniform), "groups" (row group by row group, `window` groups shuffled together:
    each group read once an epoch; give the dataset cache_groups >= 2 * window) or "auto" ("rows"
    when every row group holds one row, else "groups"); see `epoch_order`.
    """

    def __init__(self, dataset: ParquetDataset, batch_size: int, seed: int | torch.Tensor,
                 position: tuple[int, int] = (0, 0), rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 drop_last: bool = True, shuffle: str = "rows", window: int = 4):
        self._pool = None  # first, so that close() works even if a check below fails
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, "
                             f"{world_size}")
        if shuffle not in SHUFFLES or window < 1:
            raise ValueError(f"need shuffle in {SHUFFLES} and window >= 1, got {shuffle!r}, {window}")
        if shuffle == "auto":
            shuffle = "groups" if dataset.max_group_rows() > 1 else "rows"
        self.shuffle, self.window = shuffle, window
        self._groups = dataset.sample_groups() if shuffle == "groups" else None
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.drop_last = rank, drop_last
        self.global_batch = batch_size * world_size
        if drop_last and len(dataset) < self.global_batch:
            raise DataError(f"{', '.join(dataset.files)}: {len(dataset)} samples cannot fill one global "
                            f"batch of {self.global_batch} (training.batch_size); lower it, or add data (DIR:N "
                            "repeats a folder)")
        epoch, index = position
        if epoch < 0 or index < 0:
            raise ValueError(f"position must be non-negative, got {position}")
        self._next = self._roll(int(epoch), int(index))  # position of the next batch to yield
        self._submitted = self._next  # position of the next batch to hand to a worker
        self._pending: deque[Future] = deque()
        self._order = (-1, None)  # (epoch, order): one permutation per epoch, not per batch
        self._prefetch = 2 * num_workers  # batches in flight: bounded memory, the step never waits
        self._closed = False
        if num_workers > 0:
            self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="fvfunc-data")

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, index) of the next batch to be yielded: what a checkpoint stores."""
        return self._next

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def _roll(self, epoch: int, index: int) -> tuple[int, int]:
        """The position itself, or the next epoch's start when no batch begins at `index`."""
        last = len(self.dataset) - (self.global_batch if self.drop_last else 1)
        return (epoch, index) if index <= last else (epoch + 1, 0)

    def _indices(self, position: tuple[int, int]) -> list[int]:
        """This rank's dataset indices for the batch at `position`."""
        epoch, index = position
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.dataset), self.seed, epoch, self._groups, self.window))
        order = self._order[1]
        if index + self.global_batch > len(order):  # drop_last=False: wrap to the epoch's start
            order = order.repeat((index + self.global_batch) // len(order) + 1)
        batch = order[index: index + self.global_batch]
        return batch[self.rank * self.batch_size: (self.rank + 1) * self.batch_size].tolist()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise RuntimeError("this Loader is closed")
        if self._pool is None:
            batch = self.dataset.batch(self._indices(self._next))
        else:
            while len(self._pending) < self._prefetch:
                self._pending.append(self._pool.submit(self.dataset.batch, self._indices(self._submitted)))
                self._submitted = self._roll(self._submitted[0], self._submitted[1] + self.global_batch)
            try:
                batch = self._pending.popleft().result()
            except BaseException:
                # Drop the read-ahead so that a retry starts again at self.position.
                for f in self._pending:
                    f.cancel()
                self._pending.clear()
                self._submitted = self._next
                raise
        self._next = self._roll(self._next[0], self._next[1] + self.global_batch)
        return batch

    def close(self) -> None:
        """Stop the worker threads (waits for reads in progress, drops the rest)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
