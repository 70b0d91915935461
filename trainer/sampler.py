"""Which rows each rank reads, in an order that can be resumed mid-epoch.

Each epoch has one global order (a permutation seeded by seed + epoch). A global step takes the
next `batch_size * world_size` rows of it, and rank r reads every world_size-th of them. So a run
with 2 processes x batch 2 sees, step for step, exactly the rows a 1-process run with batch 4 sees,
and the data position is one number, `start` (rows of this epoch already consumed by all ranks),
which stays meaningful when a run is resumed with a different number of processes.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableBatchSampler:
    def __init__(self, n_rows: int, batch_size: int, rank: int = 0, world_size: int = 1, *,
                 seed: int = 0, epoch: int = 0, start: int = 0, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        self.n_rows, self.batch_size = n_rows, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.start = seed, epoch, start
        self.shuffle, self.drop_last = shuffle, drop_last

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.world_size

    def _usable(self) -> int:
        # Dropping the ragged tail keeps every rank on the same number of batches: a rank with one
        # batch fewer would leave the others waiting forever in a collective.
        return self.n_rows - self.n_rows % self.rows_per_step if self.drop_last else self.n_rows

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_rows)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n_rows, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for s in range(self.start, self._usable(), self.rows_per_step):
            rows = order[s:s + self.rows_per_step][self.rank::self.world_size]
            if len(rows):
                yield rows.tolist()

    def __len__(self) -> int:
        remaining = max(0, self._usable() - self.start)
        return -(-remaining // self.rows_per_step)
