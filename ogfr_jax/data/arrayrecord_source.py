"""Reading the ArrayRecord files written by `ogfr_jax.data.tfds_builders`.

Two views of one prepared split:
- `ArrayRecordSplit`, a grain random-access data source (len, getitem, picklable for grain's
  worker processes) of {'image': encoded bytes, 'path', 'pid', 'camid'} records, plus
  `DecodeImage`, a grain map transform that turns a record into the uint8 pixels the folder
  reader's `image_io.load_image` gives for the same file;
- `split(...)`: the split's `records.Split` (relative paths, pids, camids in the folder
  reader's order), for everything that works on labels: samplers, protocols, statistics.

  source = ArrayRecordSplit(builder_dir, 'query')
  ds = grain.MapDataset.source(source).map(DecodeImage((256, 128)))

`builder_dir` is the versioned folder the builder wrote (what `tfds_builders.build` returns,
e.g. DATA_DIR/reid_occluded_duke/1.0.0). Reading needs tensorflow-datasets (for the feature
spec) but not TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import numpy as np

from ogfr_jax.data import image_io
from ogfr_jax.data import records

SPLITS = ('train', 'query', 'gallery')


def _open(builder_dir: str, split: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(builder_dir, 'dataset_info.json')):
    raise FileNotFoundError(f'{builder_dir} is not a prepared TFDS dataset folder (no '
                            'dataset_info.json); pass the folder tfds_builders.build returned')
  builder = tfds.builder_from_directory(builder_dir)
  if split not in builder.info.splits:
    raise ValueError(f'{builder_dir} has no split {split!r}; it has '
                     f'{", ".join(sorted(builder.info.splits))}')
  if builder.info.file_format.value != 'array_record':
    raise ValueError(f'{builder_dir} was written as {builder.info.file_format.value}, not '
                     'array_record (random access needs ArrayRecord)')
  return builder.as_data_source(split=split)


def _record(raw: dict[str, Any]) -> dict[str, Any]:
  path = raw['path']
  return {'image': bytes(raw['image']),
          'path': path.decode('utf-8') if isinstance(path, bytes) else str(path),
          'pid': int(raw['pid']), 'camid': int(raw['camid'])}


class ArrayRecordSplit:
  """grain data source over one split: record i is the folder reader's i-th image."""

  def __init__(self, builder_dir: str | os.PathLike, split: str):
    if split not in SPLITS:
      raise ValueError(f'split {split!r}: use one of {SPLITS}')
    self.builder_dir = os.path.abspath(os.fspath(builder_dir))
    self.split = split
    self._source = _open(self.builder_dir, split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self._source)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f'record {index} out of range for {n} records of {self.split}')
    return _record(self._source[index % n])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [_record(r) for r in self._source.__getitems__([int(i) for i in indices])]

  # Reopened in each grain worker process rather than pickled with its file handles.
  def __getstate__(self) -> dict[str, Any]:
    return {'builder_dir': self.builder_dir, 'split': self.split}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.builder_dir, self.split = state['builder_dir'], state['split']
    self._source = _open(self.builder_dir, self.split)

  def __repr__(self) -> str:
    return f'ArrayRecordSplit({self.builder_dir!r}, {self.split!r}, {len(self)} records)'


def split(builder_dir: str | os.PathLike, name: str, *, chunk: int = 1024) -> records.Split:
  """The records.Split of a prepared split: paths relative to the original dataset folder,
  pids and camids, in record order (= the folder reader's order)."""
  source = ArrayRecordSplit(builder_dir, name)
  paths, pids, camids = [], [], []
  for start in range(0, len(source), chunk):
    for r in source.__getitems__(range(start, min(start + chunk, len(source)))):
      paths.append(r['path'])
      pids.append(r['pid'])
      camids.append(r['camid'])
  return records.Split.from_lists(paths, pids, camids)


def dataset_splits(builder_dir: str | os.PathLike, name: Optional[str] = None
                   ) -> records.DatasetSplits:
  """All prepared splits as records.DatasetSplits (an absent split is empty). `name` defaults
  to the dataset name of the reader the builder used (e.g. 'occluded_duke')."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder_dir = os.path.abspath(os.fspath(builder_dir))
  info = tfds.builder_from_directory(builder_dir).info
  empty = records.Split.from_lists([], [], [])
  parts = {s: split(builder_dir, s) if s in info.splits else empty for s in SPLITS}
  if name is None:
    name = info.name[len('reid_'):] if info.name.startswith('reid_') else info.name
  return records.DatasetSplits(name=name, root=builder_dir, **parts)


@dataclasses.dataclass(frozen=True)
class DecodeImage:
  """grain map transform: a record -> {'image': uint8 [H, W, 3], 'pid', 'camid', 'path'}
  (`image_io` decoding, so the pixels equal the folder reader's for the same file)."""
  size: Optional[tuple[int, int]] = None  # (height, width); None keeps the stored size

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    image = image_io.load_image_bytes(record['image'], size=self.size, name=record['path'])
    return {'image': image, 'pid': np.int32(record['pid']), 'camid': np.int32(record['camid']),
            'path': record['path']}
