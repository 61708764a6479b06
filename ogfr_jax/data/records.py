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


@dataclasses.dataclass(frozen=True)
class PixelMasks:
  """Per-image pixel masks of a split (e.g. the synthetic benchmark's planted contamination),
  kept bit-packed along the width until a row is read.

  rows[i] is the row of `packed` holding image i's mask, or -1 where image i has none (all
  zeros). Masks are at the stored image size (height x width); readers resize them with the
  image.
  """
  rows: np.ndarray  # int32 [n]
  packed: np.ndarray  # uint8 [m, height, ceil(width / 8)]
  height: int
  width: int

  def __post_init__(self):
    if self.packed.ndim != 3 or self.packed.shape[1:] != (self.height, (self.width + 7) // 8):
      raise ValueError(f'packed masks of shape {self.packed.shape} do not hold '
                       f'{self.height}x{self.width} masks')
    if self.rows.ndim != 1 or (self.rows.size and (self.rows.max() >= len(self.packed)
                                                   or self.rows.min() < -1)):
      raise ValueError('mask rows must be -1 or index the packed masks')

  def __len__(self) -> int:
    return int(self.rows.size)

  @property
  def num_masked(self) -> int:
    """Images that have a mask."""
    return int(np.count_nonzero(self.rows >= 0))

  def mask(self, index: int) -> np.ndarray | None:
    """bool [height, width] of image `index`, or None where it has none."""
    row = int(self.rows[index])
    if row < 0:
      return None
    return np.unpackbits(self.packed[row], axis=-1, count=self.width).astype(bool)
