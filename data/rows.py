"""RowsDataset: the base of every dataset here, a table of rows seen through an optional subset of them."""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch


class RowsDataset(torch.utils.data.Dataset):
    """A dataset of `n_rows` rows that can be viewed through a subset of them (the train/val carve-off).

    `row_lengths` (tokens of each underlying row, or None) is what `lengths` shows through the view: the
    sampler batches rows of similar length together where it is set, and leaves the order alone where it
    is None (fixed-length rows).
    """

    n_rows: int  # rows of the underlying data, whatever the view
    rows: np.ndarray | None = None  # the rows this view shows, None = all
    row_lengths: torch.Tensor | None = None

    def subset(self, rows: np.ndarray | Sequence[int]) -> "RowsDataset":
        """A view of some of this dataset's rows (indices into this view), sharing the underlying data."""
        view = copy.copy(self)
        rows = np.asarray(rows, dtype=np.int64)
        view.rows = rows if self.rows is None else self.rows[rows]
        return view

    def __len__(self) -> int:
        return self.n_rows if self.rows is None else len(self.rows)

    @property
    def lengths(self) -> torch.Tensor | None:
        """Tokens of each row of this view (None: rows are not length-grouped)."""
        if self.row_lengths is None or self.rows is None:
            return self.row_lengths
        return self.row_lengths[torch.from_numpy(self.rows)]

    def _row(self, i: int) -> int:
        """The underlying row of this view's i-th row."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self.rows is None else int(self.rows[i])
