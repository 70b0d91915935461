"""Which rows each rank reads, in an order that can be resumed mid-epoch.

Each epoch has one global order (a permutation seeded by seed + epoch). A global step takes the
next `batch_size * world_size` rows of it, and rank r reads every world_size-th of them. So a run
with 2 processes x batch 2 sees, step for step, exactly the rows a 1-process run with batch 4 sees,
and the data position is one number, `start` (rows of this epoch already consumed by all ranks),
which stays meaningful when a run is resumed with a different number of processes.

Variable-length rows (SFT) pass `lengths`: the epoch's order is then length-grouped, so the rows of one
optimizer step (`group_rows` = batch_size x world_size x accumulation_steps) have similar lengths and
padding stays small. It is still one deterministic order per (seed, epoch, group_rows), so resume, DDP
and accumulation work exactly as above (2 processes x batch 2 or batch 2 x 2 accumulation steps read the
rows that batch 4 reads).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class ResumableBatchSampler:
    def __init__(self, n_rows: int, batch_size: int, rank: int = 0, world_size: int = 1, *,
                 seed: int = 0, epoch: int = 0, start: int = 0, shuffle: bool = True,
                 drop_last: bool = True, lengths: Sequence[int] | torch.Tensor | None = None,
                 group_rows: int | None = None, group_steps: int = 32) -> None:
        self.n_rows, self.batch_size = n_rows, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.start = seed, epoch, start
        self.shuffle, self.drop_last = shuffle, drop_last
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.group_rows = group_rows or self.rows_per_micro_batch
        self.group_steps = group_steps

    @property
    def rows_per_micro_batch(self) -> int:
        return self.batch_size * self.world_size

    def _usable(self) -> int:
        # Dropping the ragged tail keeps every rank on the same number of batches: a rank with one
        # batch fewer would leave the others waiting forever in a collective.
        return self.n_rows - self.n_rows % self.rows_per_micro_batch if self.drop_last else self.n_rows

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_rows)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n_rows, generator=g)
        return order if self.lengths is None else self._group_by_length(order, g)

    def _group_by_length(self, order: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Cut the shuffled rows into windows of group_steps steps, sort each window by length and cut it
        into steps of group_rows rows, then shuffle the steps: similar lengths within a step, a random
        mix of lengths across steps."""
        step = self.group_rows
        window = step * self.group_steps
        batches: list[torch.Tensor] = []
        for w in range(0, len(order), window):
            rows = order[w:w + window]
            batches += rows[self.lengths[rows].argsort(descending=True, stable=True)].split(step)
        # Windows are whole steps, so only the very last batch can be short: it stays last (drop_last cuts it).
        full = [b for b in batches if len(b) == step]
        tail = [b for b in batches if len(b) < step]
        return torch.cat([full[i] for i in torch.randperm(len(full), generator=g)] + tail)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for s in range(self.start, self._usable(), self.rows_per_micro_batch):
            rows = order[s:s + self.rows_per_micro_batch][self.rank::self.world_size]
            if len(rows):
                yield rows.tolist()

    def __len__(self) -> int:
        remaining = max(0, self._usable() - self.start)
        return -(-remaining // self.rows_per_micro_batch)
