"""The in-memory form every dataset reader returns.

A split is three parallel arrays (image path, person id, camera id). Train pids are already
relabelled to 0..N-1 in sorted order of the original ids; query/gallery keep the original ids
so that matches across the two are by identity (pid 0 is the Market-1501 distractor class).
Camera ids are 0-based.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  paths: tuple[str, ...]
  pids: np.ndarray  # int32 [n]
  camids: np.ndarray  # int32 [n]

  def __post_init__(self):
    n = len(self.paths)
    if self.pids.shape != (n,) or self.camids.shape != (n,):
      raise ValueError(
          f'split arrays disagree in length: {n} paths, pids {self.pids.shape}, '
          f'camids {self.camids.shape}')

  def __len__(self) -> int:
    return len(self.paths)

  @property
  def num_ids(self) -> int:
    return int(np.unique(self.pids).size)

  @property
  def num_cameras(self) -> int:
    return int(np.unique(self.camids).size)

  def stats(self) -> dict[str, int]:
    return {'ids': self.num_ids, 'images': len(self), 'cameras': self.num_cameras}

  @classmethod
  def from_lists(cls, paths, pids, camids) -> 'Split':
    return cls(tuple(str(p) for p in paths), np.asarray(pids, np.int32).reshape(-1),
               np.asarray(camids, np.int32).reshape(-1))


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
  name: str
  root: str
  train: Split
  query: Split
  gallery: Split
  # Files seen in the dataset folders that are not images of the dataset, by folder.
  ignored: Mapping[str, int] = dataclasses.field(default_factory=dict)

  @property
  def num_train_ids(self) -> int:
    return self.train.num_ids

  @property
  def num_cameras(self) -> int:
    """Camera-embedding table size: covers every camid seen in any split."""
    cams = [s.camids.max() for s in (self.train, self.query, self.gallery) if len(s)]
    return int(max(cams)) + 1 if cams else 0

  def stats(self) -> dict[str, dict[str, int]]:
    return {'train': self.train.stats(), 'query': self.query.stats(),
            'gallery': self.gallery.stats()}


def relabel(pids) -> tuple[np.ndarray, dict[int, int]]:
  """Maps original ids to 0..N-1 in sorted order (never set order, which is not stable)."""
  pids = np.asarray(pids, np.int64)
  uniq = np.unique(pids)  # sorted
  mapping = {int(p): i for i, p in enumerate(uniq)}
  return np.searchsorted(uniq, pids).astype(np.int32), mapping
