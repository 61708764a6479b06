"""Tiny dataset trees in the on-disk layouts of the public releases, for tests.

Each `make_*` function writes real (tiny) image files with PIL under a folder it creates and
returns a FixtureTree describing what a correct reader must find there: every kept record with
its original pid and 0-based camera, and the ignored-file count per folder. The expectations are
written out by hand from the layout rules, not computed by the readers under test.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional

import numpy as np
from PIL import Image

# (path relative to the dataset root, original pid, 0-based camid)
Record = tuple[str, int, int]

SUBSETS = ('train', 'query', 'gallery')


@dataclasses.dataclass(frozen=True)
class FixtureTree:
  name: str  # dataset name in the registry
  root: pathlib.Path
  expected: dict[str, list[Record]]
  ignored: dict[str, int]
  # msmt17 only: the training records when list_val.txt is merged in.
  merged_train: Optional[list[Record]] = None

  def stats(self, merged: bool = False) -> dict[str, dict[str, int]]:
    """Expected {'train': {'ids', 'images', 'cameras'}, 'query': ..., 'gallery': ...}."""
    out = {}
    for subset in SUBSETS:
      records = self.merged_train if merged and subset == 'train' else self.expected[subset]
      out[subset] = {'ids': len({r[1] for r in records}), 'images': len(records),
                     'cameras': len({r[2] for r in records})}
    return out


def write_image(path: os.PathLike, size: tuple[int, int] = (16, 8), seed: int = 0,
                mode: str = 'RGB') -> pathlib.Path:
  """Writes a small random image of `size` (height, width); format from the file extension."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  h, w = size
  if mode == 'RGB':
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'RGB')
  elif mode == 'L':
    img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), 'L')
  else:
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'RGB').convert(mode)
  fmt = {'.tif': 'TIFF', '.tiff': 'TIFF', '.jpg': 'JPEG', '.jpeg': 'JPEG',
         '.png': 'PNG'}[path.suffix.lower()]
  img.save(path, format=fmt)
  return path


def write_stray(path: os.PathLike, content: bytes = b'not an image') -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  return path


def _write_all(root: pathlib.Path, relpaths: list[str]) -> None:
  for i, rel in enumerate(relpaths):
    write_image(root / rel, seed=i)


# ------------------------------------------------------------------------------------------------
# Market-1501 family


def _market_name(pid: int, cam: int, frame: int) -> str:
  pid_text = '-1' if pid == -1 else f'{pid:04d}'
  return f'{pid_text}_c{cam}s1_{frame:06d}_01.jpg'


def _duke_name(pid: int, cam: int, frame: int) -> str:
  pid_text = '-1' if pid == -1 else f'{pid:04d}'
  return f'{pid_text}_c{cam}_f{frame:07d}.jpg'


_FOLDER = {'train': 'bounding_box_train', 'query': 'query', 'gallery': 'bounding_box_test'}


def _bounding_box_tree(name: str, root: pathlib.Path, naming, on_disk: dict[str, list],
                       strays: dict[str, list[str]], bad_images: dict[str, list[str]],
                       ) -> FixtureTree:
  """on_disk: subset -> [(pid, camera on disk 1-based)]; pid -1 junk and distractors included."""
  expected: dict[str, list[Record]] = {}
  relpaths = []
  frame = 100
  for subset, items in on_disk.items():
    expected[subset] = []
    for pid, cam in items:
      frame += 7
      rel = f'{_FOLDER[subset]}/{naming(pid, cam, frame)}'
      relpaths.append(rel)
      if pid == -1 or (pid == 0 and subset != 'gallery'):
        continue  # junk is dropped everywhere; distractors survive only in the gallery
      expected[subset].append((rel, pid, cam - 1))
  _write_all(root, relpaths)
  ignored = {}
  for folder, names in strays.items():
    for n in names:
      write_stray(root / folder / n)
    ignored[folder] = ignored.get(folder, 0) + len(names)
  for folder, names in bad_images.items():
    for i, n in enumerate(names):
      write_image(root / folder / n, seed=1000 + i)
    ignored[folder] = ignored.get(folder, 0) + len(names)
  return FixtureTree(name=name, root=root, expected=expected, ignored=ignored)


def make_market1501(parent: os.PathLike, name: str = 'market1501',
                    folder: str = 'Market-1501-v15.09.15') -> FixtureTree:
  """Market-1501: 4 train ids over 6 cameras, junk (-1) and distractor (0000) gallery images,
  Thumbs.db / .DS_Store / readme.txt strays and one image file with a foreign name."""
  root = pathlib.Path(parent) / folder
  on_disk = {
      'train': [(2, 1), (2, 3), (7, 2), (7, 2), (7, 5), (15, 1), (15, 6), (100, 4)],
      'query': [(3, 1), (9, 2), (9, 4)],
      'gallery': [(3, 2), (3, 5), (9, 1), (0, 3), (0, 6), (-1, 1), (-1, 2)],
  }
  return _bounding_box_tree(
      name, root, _market_name, on_disk,
      strays={'bounding_box_train': ['Thumbs.db', '._0002_c1s1_000107_01.jpg'],
              'bounding_box_test': ['Thumbs.db', 'readme.txt'],
              'query': ['.DS_Store']},
      bad_images={'query': ['IMG_0001.jpg']})


def make_dukemtmc(parent: os.PathLike, folder: str = 'DukeMTMC-reID') -> FixtureTree:
  """DukeMTMC-reID: 3 train ids over 5 of 8 cameras; a gallery-only id; a Thumbs.db."""
  root = pathlib.Path(parent) / folder
  on_disk = {
      'train': [(1, 1), (1, 2), (5, 3), (5, 8), (12, 7)],
      'query': [(20, 1), (33, 2)],
      'gallery': [(20, 4), (33, 2), (33, 6), (40, 8)],
  }
  return _bounding_box_tree('dukemtmc', root, _duke_name, on_disk,
                            strays={'bounding_box_train': ['Thumbs.db']}, bad_images={})


def make_occluded_duke(parent: os.PathLike, folder: str = 'Occluded_Duke') -> FixtureTree:
  """Occluded-Duke: Duke naming; train ids deliberately out of creation order (relabel check)."""
  root = pathlib.Path(parent) / folder
  on_disk = {
      'train': [(905, 3), (8, 1), (8, 1), (64, 2), (905, 5)],
      'query': [(11, 1), (11, 3), (70, 2)],
      'gallery': [(11, 2), (70, 1), (70, 4), (88, 8)],
  }
  return _bounding_box_tree('occluded_duke', root, _duke_name, on_disk,
                            strays={'query': ['desktop.ini']},
                            bad_images={'bounding_box_test': ['0011_c2.jpg']})


# ------------------------------------------------------------------------------------------------
# Test-only sets


def make_occluded_reid(parent: os.PathLike, ext: str = '.tif',
                       folder: str = 'Occluded_REID') -> FixtureTree:
  """Occluded-REID: <split>/<pid>/<pid>_<k><ext>; .tif as released (.jpg in converted copies)."""
  root = pathlib.Path(parent) / folder
  pids = [1, 2, 7]
  expected: dict[str, list[Record]] = {'train': [], 'query': [], 'gallery': []}
  relpaths = []
  for subset, split_folder, camid, ks in (('query', 'occluded_body_images', 0, (1, 2)),
                                          ('gallery', 'whole_body_images', 1, (1, 3))):
    for pid in pids:
      for k in ks:
        rel = f'{split_folder}/{pid:03d}/{pid:03d}_{k:02d}{ext}'
        relpaths.append(rel)
        expected[subset].append((rel, pid, camid))
  _write_all(root, relpaths)
  write_stray(root / 'occluded_body_images' / '002' / 'Thumbs.db')
  write_stray(root / 'whole_body_images' / 'readme.txt')
  # An image whose name disagrees with its identity folder is not trusted.
  write_image(root / 'whole_body_images' / '007' / f'002_09{ext}', seed=99)
  return FixtureTree(name='occluded_reid', root=root, expected=expected,
                     ignored={'occluded_body_images': 1, 'whole_body_images': 2})


def make_partial_reid(parent: os.PathLike, folder: str = 'Partial_REID') -> FixtureTree:
  """Partial-REID: partial_body_images/<pid>_<k>.jpg and whole_body_images/<pid>_<k>.jpg, plus
  the release's occluded_body_images/ folder, which the reader must not use."""
  root = pathlib.Path(parent) / folder
  expected: dict[str, list[Record]] = {'train': [], 'query': [], 'gallery': []}
  relpaths = []
  for subset, split_folder, camid, items in (
      ('query', 'partial_body_images', 0, [(1, 1), (1, 2), (4, 1), (60, 3)]),
      ('gallery', 'whole_body_images', 1, [(1, 1), (4, 1), (4, 2), (60, 1)])):
    for pid, k in items:
      rel = f'{split_folder}/{pid:03d}_{k:02d}.jpg'
      relpaths.append(rel)
      expected[subset].append((rel, pid, camid))
  relpaths.append('occluded_body_images/001_01.jpg')
  _write_all(root, relpaths)
  write_stray(root / 'partial_body_images' / 'Thumbs.db')
  return FixtureTree(name='partial_reid', root=root, expected=expected,
                     ignored={'partial_body_images': 1})


def make_partial_ilids(parent: os.PathLike, folder: str = 'Partial_iLIDS') -> FixtureTree:
  """Partial-iLIDS: one image per identity and side, named <pid>.jpg."""
  root = pathlib.Path(parent) / folder
  expected: dict[str, list[Record]] = {'train': [], 'query': [], 'gallery': []}
  relpaths = []
  for subset, split_folder, camid in (('query', 'partial_body_images', 0),
                                      ('gallery', 'whole_body_images', 1)):
    for pid in (1, 2, 119):
      rel = f'{split_folder}/{pid:03d}.jpg'
      relpaths.append(rel)
      expected[subset].append((rel, pid, camid))
  _write_all(root, relpaths)
  write_stray(root / 'whole_body_images' / '.DS_Store')
  write_image(root / 'whole_body_images' / '001_copy.jpg', seed=7)
  return FixtureTree(name='partial_ilids', root=root, expected=expected,
                     ignored={'whole_body_images': 2})


# ------------------------------------------------------------------------------------------------
# MSMT17


def _msmt_name(pid: int, index: int, cam: int, frame: int) -> str:
  return f'{pid:04d}_{index:03d}_{cam:02d}_0303morning_{frame:04d}_0.jpg'


def make_msmt17(parent: os.PathLike, version: str = 'v1') -> FixtureTree:
  """MSMT17_V1 (train/, test/) or MSMT17_V2 (mask_train_v2/, mask_test_v2/) with list files.

  Train ids 0, 4, 9 and val ids 4, 6: merged training relabels over {0, 4, 6, 9}. Cameras go up
  to 15 (two-digit field in the name). A Thumbs.db sits in one identity folder.
  """
  if version not in ('v1', 'v2'):
    raise ValueError(f'version must be v1 or v2, got {version!r}')
  root = pathlib.Path(parent) / ('MSMT17_V1' if version == 'v1' else 'MSMT17_V2')
  train_dir, test_dir = ('train', 'test') if version == 'v1' else ('mask_train_v2', 'mask_test_v2')
  lists = {
      'train': (train_dir, [(0, 1), (0, 15), (4, 3), (9, 3), (9, 7)]),
      'val': (train_dir, [(4, 2), (6, 11)]),
      'query': (test_dir, [(0, 1), (1, 5)]),
      'gallery': (test_dir, [(0, 2), (1, 5), (1, 9), (2, 14)]),
  }
  records: dict[str, list[Record]] = {}
  relpaths = []
  index = 0
  for list_name, (image_dir, items) in lists.items():
    lines = []
    records[list_name] = []
    for pid, cam in items:
      index += 1
      entry = f'{pid:04d}/{_msmt_name(pid, index, cam, 10 + index)}'
      lines.append(f'{entry} {pid}')
      rel = f'{image_dir}/{entry}'
      relpaths.append(rel)
      records[list_name].append((rel, pid, cam - 1))
    (root / f'list_{list_name}.txt').parent.mkdir(parents=True, exist_ok=True)
    (root / f'list_{list_name}.txt').write_text('\n'.join(lines) + '\n')
  _write_all(root, relpaths)
  write_stray(root / train_dir / '0004' / 'Thumbs.db')
  return FixtureTree(
      name='msmt17', root=root,
      expected={'train': records['train'], 'query': records['query'],
                'gallery': records['gallery']},
      ignored={train_dir: 1}, merged_train=records['train'] + records['val'])


# Every layout with its builder, for tests that run over all of them.
ALL_LAYOUTS = {
    'market1501': make_market1501,
    'dukemtmc': make_dukemtmc,
    'occluded_duke': make_occluded_duke,
    'occluded_reid': make_occluded_reid,
    'partial_reid': make_partial_reid,
    'partial_ilids': make_partial_ilids,
    'msmt17': make_msmt17,
    'synthetic': lambda parent: make_market1501(parent, name='synthetic', folder='synthetic'),
}
