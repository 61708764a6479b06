"""Readers for the public person re-identification datasets, in their released folder layouts.

Each reader turns a dataset's own folder into (path, pid, camid) records (ogfr_jax.data.records).
Conventions shared by all readers, because evaluation protocols depend on them:
- Camera ids are 0-based. Market-1501, DukeMTMC-reID, Occluded-Duke and MSMT17 number cameras
  from 1 on disk; the test-only sets have no cameras, so their query is camera 0 and their gallery
  camera 1 (an image index is never a camera: using it would let the same-camera filter of the
  Market protocol drop true matches at random).
- Train pids are relabelled to 0..N-1 in sorted order of the original ids; query and gallery keep
  the original ids so that they match each other.
- Market-style pid -1 ('junk') images are dropped everywhere. pid 0 ('distractor') images are kept
  in the gallery only: they are not an identity, so they must never be a class to train on nor a
  query to answer.
- Image files are recognised by extension, in any letter case: .jpg .jpeg .png .tif .tiff .bmp.
  The original releases use .jpg (Occluded-REID: .tif), but converted copies circulate (e.g.
  Occluded-REID as .jpg), and the embedded benchmark may use any of these.
- Other files (Thumbs.db, .DS_Store, macOS '._*' forks and other hidden files, readme.txt,
  sub-folders where none are expected) are stray: ignored and counted in DatasetSplits.ignored
  under the split folder they sit in (Occluded-REID: including its identity sub-folders). A file
  with an image extension whose name does not parse is also ignored and counted, with a warning
  that names a few examples. Junk (-1) images are dropped by convention and only logged.
  MSMT17 reads its lists, so only non-image files under its image folders count as ignored.
- A folder whose image files all fail to parse (a dataset read with the wrong reader, or a
  renamed copy) is an error naming the folder, the expected pattern and some of the names, and
  so is a query or gallery folder without usable images. Every such error about what is on disk
  is a `DatasetError` (a ValueError; `DatasetNotFoundError`, also a FileNotFoundError, for a
  missing folder, file or root): entry points print it as one line, without a traceback.
- An image file of 0 bytes (an interrupted copy or download) is named when its folder is
  scanned: an error, or with empty_images='skip' (config.input.corrupt_image_policy='skip') a
  warning, the file then being replaced when read like any corrupt image.

Layouts (root is the dataset's own folder):
  market1501, dukemtmc, occluded_duke, synthetic:
      bounding_box_train/ (train), query/, bounding_box_test/ (gallery)
      Market names 0002_c1s1_000451_03.jpg; Duke and Occluded-Duke names 0001_c2_f0046182.jpg.
  occluded_reid: occluded_body_images/<pid>/<pid>_<k>.tif (query),
      whole_body_images/<pid>/<pid>_<k>.tif (gallery); test only.
  partial_reid: partial_body_images/<pid>_<k>.jpg (query), whole_body_images/<pid>_<k>.jpg
      (gallery); test only. Other folders of the release (occluded_body_images/) are not read.
  partial_ilids: partial_body_images/<pid>.jpg (query), whole_body_images/<pid>.jpg (gallery);
      test only.
  msmt17: list_train.txt, list_val.txt, list_query.txt, list_gallery.txt with lines
      '<relative path> <pid>'; images under train/ and test/ (MSMT17_V1) or mask_train_v2/ and
      mask_test_v2/ (MSMT17_V2), detected from which folders exist. The camera is the third '_'
      field of the file name (0000_011_01_0303morning_0015_0.jpg is camera 1 on disk).
      list_val.txt is merged into training only with merge_train_val=True.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import os
import re
from typing import Callable, Iterable, Optional

from absl import logging

from ogfr_jax.data.records import DatasetSplits, Split, relabel

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.tif', '.tiff', '.bmp')
JUNK_PID = -1
DISTRACTOR_PID = 0
_EXAMPLES_IN_WARNINGS = 3

Reader = Callable[..., DatasetSplits]
# A name parser gets the file name without extension and returns (pid, camid on disk) or None.
NameParser = Callable[[str], Optional[tuple[int, int]]]

_READERS: dict[str, Reader] = {}
EMPTY_IMAGE_POLICIES = ('fail', 'skip')
# What a scan does with 0-byte image files; set by get_dataset for the reader it calls.
_EMPTY_IMAGES = contextvars.ContextVar('empty_images', default='fail')


class DatasetError(ValueError):
  """A dataset folder that does not hold what its reader expects, or a bad dataset request.

  User-facing: the message names the folder (or file) and what was expected, so an entry
  point prints it as one line `error: <message>` and exits with status 2, without a
  traceback (see ogfr_jax.tools.cli).
  """


class DatasetNotFoundError(DatasetError, FileNotFoundError):
  """A folder, list file or image that the layout requires is missing."""


def register(name: str) -> Callable[[Reader], Reader]:
  """Decorator adding a reader `fn(root, **options) -> DatasetSplits` under `name`."""
  def add(fn: Reader) -> Reader:
    if name in _READERS:
      raise ValueError(f'dataset {name!r} is already registered')
    _READERS[name] = fn
    return fn
  return add


def dataset_names() -> tuple[str, ...]:
  return tuple(sorted(_READERS))


def get_dataset(name: str, root: str | os.PathLike, *, empty_images: str = 'fail',
                **options) -> DatasetSplits:
  """Reads dataset `name` from its own folder `root` (see the module docstring for layouts).

  empty_images: 'fail' (0-byte image files are an error naming them) or 'skip' (a warning
  naming them; the pipeline replaces them when read, config.input.corrupt_image_policy).
  """
  if empty_images not in EMPTY_IMAGE_POLICIES:
    raise DatasetError(f'empty_images={empty_images!r}: use one of {list(EMPTY_IMAGE_POLICIES)}')
  if name not in _READERS:
    raise DatasetError(f'unknown dataset {name!r}; known datasets: {", ".join(dataset_names())}')
  reader = _READERS[name]
  accepted = [p for p in inspect.signature(reader).parameters if p != 'root']
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise DatasetError(f'dataset {name!r} does not take option(s) {", ".join(unknown)}; '
                     f'it accepts: {", ".join(accepted) or "none"}')
  root = os.fspath(root)
  if not root:
    raise DatasetError(f'dataset {name!r}: no root folder given')
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise DatasetNotFoundError(f'dataset {name!r}: root folder {root} does not exist')
  token = _EMPTY_IMAGES.set(empty_images)
  try:
    return reader(root, **options)
  finally:
    _EMPTY_IMAGES.reset(token)


# ------------------------------------------------------------------------------------------------
# Folder scanning


@dataclasses.dataclass
class _Scan:
  paths: list[str] = dataclasses.field(default_factory=list)
  pids: list[int] = dataclasses.field(default_factory=list)
  camids: list[int] = dataclasses.field(default_factory=list)  # as on disk
  stray: int = 0
  unparsed: list[str] = dataclasses.field(default_factory=list)  # relative to the scanned folder
  empty: list[str] = dataclasses.field(default_factory=list)  # added images of 0 bytes, relative

  def add(self, path: str, pid: int, camid: int, entry: os.DirEntry, name: str) -> None:
    self.paths.append(path)
    self.pids.append(pid)
    self.camids.append(camid)
    if entry.stat().st_size == 0:
      self.empty.append(name)

  @property
  def ignored(self) -> int:
    return self.stray + len(self.unparsed)


def _is_image_name(filename: str) -> bool:
  # Hidden files are never images of a dataset; archives packed on macOS carry '._<name>.jpg'
  # resource forks next to every image, which would otherwise read as malformed image names.
  return (not filename.startswith('.')
          and os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS)


def _nesting_hint(root: str, expected: str) -> str:
  """Names a sub-folder of root that holds `expected`, the usual mistake being one level off."""
  try:
    subdirs = sorted(e.path for e in os.scandir(root) if e.is_dir())
  except OSError:
    return ''
  for sub in subdirs:
    if os.path.exists(os.path.join(sub, expected)):
      return f' (it exists under {sub}: pass that folder as the root)'
  return ''


def _require_dir(dataset: str, root: str, folder: str, layout: str) -> str:
  path = os.path.join(root, folder)
  if not os.path.isdir(path):
    raise DatasetNotFoundError(
        f'dataset {dataset!r}: expected folder {path} is missing (layout: {layout})'
        f'{_nesting_hint(root, folder)}')
  return path


def _require_file(dataset: str, root: str, filename: str, layout: str) -> str:
  path = os.path.join(root, filename)
  if not os.path.isfile(path):
    raise DatasetNotFoundError(
        f'dataset {dataset!r}: expected file {path} is missing (layout: {layout})'
        f'{_nesting_hint(root, filename)}')
  return path


def _scan_flat(folder: str, parse: NameParser) -> _Scan:
  """Images directly inside `folder`; sub-folders and non-image files count as stray."""
  scan = _Scan()
  for entry in sorted(os.scandir(folder), key=lambda e: e.name):
    if not entry.is_file() or not _is_image_name(entry.name):
      scan.stray += 1
      continue
    parsed = parse(os.path.splitext(entry.name)[0])
    if parsed is None:
      scan.unparsed.append(entry.name)
    else:
      scan.add(entry.path, *parsed, entry, entry.name)
  return scan


def _scan_pid_folders(folder: str, parse: NameParser) -> _Scan:
  """Images in per-identity sub-folders `<pid>/<name>` whose name must carry the same pid."""
  scan = _Scan()
  for entry in sorted(os.scandir(folder), key=lambda e: e.name):
    if entry.is_file():
      if _is_image_name(entry.name):
        scan.unparsed.append(entry.name)  # an image outside any identity folder
      else:
        scan.stray += 1
      continue
    if not entry.is_dir() or not entry.name.isdigit():
      scan.stray += 1
      continue
    folder_pid = int(entry.name)
    for sub in sorted(os.scandir(entry.path), key=lambda e: e.name):
      if not sub.is_file() or not _is_image_name(sub.name):
        scan.stray += 1
        continue
      parsed = parse(os.path.splitext(sub.name)[0])
      if parsed is None or parsed[0] != folder_pid:
        scan.unparsed.append(f'{entry.name}/{sub.name}')
      else:
        scan.add(sub.path, *parsed, sub, f'{entry.name}/{sub.name}')
  return scan


def _report_empty(dataset: str, folder: str, scan: _Scan, *, train: bool) -> None:
  """0-byte image files: an error naming them, or for training images under
  empty_images='skip' a warning (only training images are replaced when unreadable)."""
  if not scan.empty:
    return
  what = (f'{len(scan.empty)} image file(s) of 0 bytes in {folder}: {_examples(scan.empty)} '
          '(an interrupted copy or download?)')
  if train and _EMPTY_IMAGES.get() == 'skip':
    logging.warning('%s: %s; each is replaced by another image of its identity when read '
                    '(config.input.corrupt_image_policy=skip)', dataset, what)
    return
  remedy = ('Copy them again or delete them' + (
      ', or pass --config.input.corrupt_image_policy=skip to replace them by other images of '
      'their identity' if train else ''))
  raise DatasetError(f'dataset {dataset!r}: {what}. {remedy}')


def _report_ignored(dataset: str, folder: str, scan: _Scan, pattern: str,
                    ignored: dict[str, int]) -> None:
  if scan.unparsed:
    examples = ', '.join(scan.unparsed[:_EXAMPLES_IN_WARNINGS])
    more = len(scan.unparsed) - _EXAMPLES_IN_WARNINGS
    logging.warning(
        '%s: ignoring %d image file(s) in %s whose names do not follow %s, e.g. %s%s',
        dataset, len(scan.unparsed), folder, pattern, examples,
        f' (and {more} more)' if more > 0 else '')
  if scan.stray:
    logging.info('%s: ignoring %d non-image entr(ies) in %s', dataset, scan.stray, folder)
  if scan.ignored:
    ignored[folder] = ignored.get(folder, 0) + scan.ignored


def _split(paths: Iterable[str], pids: Iterable[int], camids: Iterable[int]) -> Split:
  """Builds a Split sorted by path, so that record order never depends on directory order."""
  rows = sorted(zip(paths, pids, camids))
  if not rows:
    return Split.from_lists([], [], [])
  p, i, c = zip(*rows)
  return Split.from_lists(p, i, c)


def _train_split(paths: list[str], pids: list[int], camids: list[int]) -> Split:
  split = _split(paths, pids, camids)
  if not len(split):
    return split
  labels, _ = relabel(split.pids)
  return Split(split.paths, labels, split.camids)


def _examples(names: list[str]) -> str:
  more = len(names) - _EXAMPLES_IN_WARNINGS
  return ', '.join(names[:_EXAMPLES_IN_WARNINGS]) + (f' (and {more} more)' if more > 0 else '')


def _require_parsed(dataset: str, folder: str, scan: _Scan, pattern: str) -> None:
  """A folder whose image files all fail to parse holds another dataset (or renamed copies):
  an error naming the folder, the pattern and some of the names, rather than an empty split
  that fails later, far from its cause."""
  if scan.unparsed and not scan.paths:
    raise DatasetError(
        f'dataset {dataset!r}: none of the {len(scan.unparsed)} image file(s) in {folder} '
        f'is named like {pattern}: found {_examples(scan.unparsed)} (another dataset\'s '
        f'folder, or renamed files?)')


def _require_nonempty(dataset: str, where: str, split: Split, subset: str, expected: str,
                      found: str = '') -> None:
  """`where` (a folder or list file) must give at least one `subset` image."""
  if not len(split):
    raise DatasetError(f'dataset {dataset!r}: {subset} is empty: no usable images in {where} '
                       f'(expected {expected}; found {found or "none"})')


def _found(scan: _Scan, dropped: dict[str, int]) -> str:
  """What a scan found besides usable images, for an error message."""
  parts = [f'{n} {what}' for what, n in dropped.items() if n]
  if scan.unparsed:
    parts.append(f'{len(scan.unparsed)} image file(s) with other names')
  if scan.stray:
    parts.append(f'{scan.stray} other entr(ies)')
  return ', '.join(parts)


# ------------------------------------------------------------------------------------------------
# Market-1501 family: bounding_box_train/, query/, bounding_box_test/

_MARKET_NAME = re.compile(r'(-1|\d+)_c(\d+)s\d+_\d+_\d+')
_DUKE_NAME = re.compile(r'(-1|\d+)_c(\d+)_f\d+')
_MARKET_PATTERN = '<pid>_c<camera>s<sequence>_<frame>_<box>.jpg, e.g. 0002_c1s1_000451_03.jpg'
_DUKE_PATTERN = '<pid>_c<camera>_f<frame>.jpg, e.g. 0001_c2_f0046182.jpg'
_BOUNDING_BOX_FOLDERS = (('train', 'bounding_box_train'), ('query', 'query'),
                         ('gallery', 'bounding_box_test'))


def _camera_name_parser(pattern: re.Pattern) -> NameParser:
  def parse(stem: str) -> Optional[tuple[int, int]]:
    m = pattern.fullmatch(stem)
    if m is None or int(m.group(2)) < 1:  # cameras are 1-based on disk; c0 is not a camera
      return None
    return int(m.group(1)), int(m.group(2))
  return parse


def _read_bounding_box_layout(dataset: str, root: str, pattern: re.Pattern,
                              example: str) -> DatasetSplits:
  """`example`: the name pattern in words, '<pid>_c<camera>_f<frame>.jpg, e.g. ...'."""
  layout = 'bounding_box_train/, query/, bounding_box_test/ with names like ' + example
  folders = {subset: _require_dir(dataset, root, folder, layout)
             for subset, folder in _BOUNDING_BOX_FOLDERS}
  parse = _camera_name_parser(pattern)
  ignored: dict[str, int] = {}
  splits = {}
  for subset, folder in _BOUNDING_BOX_FOLDERS:
    scan = _scan_flat(folders[subset], parse)
    _report_ignored(dataset, folder, scan, f'the pattern {example}', ignored)
    _report_empty(dataset, folders[subset], scan, train=subset == 'train')
    _require_parsed(dataset, folders[subset], scan, example)
    keep = [i for i, pid in enumerate(scan.pids) if pid != JUNK_PID]
    junk = len(scan.pids) - len(keep)
    if junk:
      logging.info('%s: dropped %d junk image(s) (pid -1) in %s', dataset, junk, folder)
    distractors = 0
    if subset != 'gallery':
      distractors = sum(1 for i in keep if scan.pids[i] == DISTRACTOR_PID)
      if distractors:
        logging.warning('%s: dropped %d distractor image(s) (pid 0) from %s: distractors belong '
                        'in the gallery only', dataset, distractors, folder)
        keep = [i for i in keep if scan.pids[i] != DISTRACTOR_PID]
    paths = [scan.paths[i] for i in keep]
    pids = [scan.pids[i] for i in keep]
    camids = [scan.camids[i] - 1 for i in keep]
    if subset == 'train':
      splits[subset] = _train_split(paths, pids, camids)
      if not len(splits[subset]):
        logging.warning('%s: no training images in %s', dataset, folders[subset])
    else:
      splits[subset] = _split(paths, pids, camids)
      _require_nonempty(dataset, folders[subset], splits[subset], subset,
                        f'image files named like {example}',
                        _found(scan, {'junk image(s) (pid -1)': junk,
                                      'distractor(s) (pid 0)': distractors}))
  return DatasetSplits(name=dataset, root=root, ignored=ignored, **splits)


def _no_merge(dataset: str, merge_train_val: bool) -> None:
  if merge_train_val:
    raise DatasetError(f'dataset {dataset!r}: merge_train_val applies to msmt17 only '
                     '(this dataset has no validation list)')


@register('market1501')
def read_market1501(root: str, merge_train_val: bool = False) -> DatasetSplits:
  _no_merge('market1501', merge_train_val)
  return _read_bounding_box_layout('market1501', root, _MARKET_NAME, _MARKET_PATTERN)


@register('dukemtmc')
def read_dukemtmc(root: str, merge_train_val: bool = False) -> DatasetSplits:
  _no_merge('dukemtmc', merge_train_val)
  return _read_bounding_box_layout('dukemtmc', root, _DUKE_NAME, _DUKE_PATTERN)


@register('occluded_duke')
def read_occluded_duke(root: str, merge_train_val: bool = False) -> DatasetSplits:
  _no_merge('occluded_duke', merge_train_val)
  return _read_bounding_box_layout('occluded_duke', root, _DUKE_NAME, _DUKE_PATTERN)


@register('synthetic')
def read_synthetic(root: str, merge_train_val: bool = False) -> DatasetSplits:
  """The embedded benchmark, which is written to disk in the Market-1501 layout."""
  _no_merge('synthetic', merge_train_val)
  return _read_bounding_box_layout('synthetic', root, _MARKET_NAME, _MARKET_PATTERN)


# ------------------------------------------------------------------------------------------------
# Test-only occluded / partial sets: query is camera 0, gallery camera 1

_QUERY_CAMID = 0
_GALLERY_CAMID = 1
_PID_INDEX_NAME = re.compile(r'(\d+)_(\d+)')
_PID_NAME = re.compile(r'(\d+)')


def _pid_parser(pattern: re.Pattern) -> NameParser:
  # The camera slot is filled by the caller from the folder; the index in the name is not a camera.
  def parse(stem: str) -> Optional[tuple[int, int]]:
    m = pattern.fullmatch(stem)
    return None if m is None else (int(m.group(1)), -1)
  return parse


def _read_test_only(dataset: str, root: str, query_folder: str, gallery_folder: str,
                    pattern: re.Pattern, example: str, per_pid_folders: bool) -> DatasetSplits:
  layout = f'{query_folder}/ (query) and {gallery_folder}/ (gallery) with {example}'
  parse = _pid_parser(pattern)
  scan_fn = _scan_pid_folders if per_pid_folders else _scan_flat
  sides = (('query', query_folder, _QUERY_CAMID), ('gallery', gallery_folder, _GALLERY_CAMID))
  paths = {folder: _require_dir(dataset, root, folder, layout) for _, folder, _ in sides}
  ignored: dict[str, int] = {}
  splits = {}
  for subset, folder, camid in sides:
    path = paths[folder]
    scan = scan_fn(path, parse)
    _report_ignored(dataset, folder, scan, example, ignored)
    _report_empty(dataset, path, scan, train=False)
    _require_parsed(dataset, path, scan, example)
    splits[subset] = _split(scan.paths, scan.pids, [camid] * len(scan.paths))
    _require_nonempty(dataset, path, splits[subset], subset, f'image files named like {example}',
                      _found(scan, {}))
  return DatasetSplits(name=dataset, root=root, train=Split.from_lists([], [], []),
                       ignored=ignored, **splits)


@register('occluded_reid')
def read_occluded_reid(root: str, merge_train_val: bool = False) -> DatasetSplits:
  _no_merge('occluded_reid', merge_train_val)
  return _read_test_only('occluded_reid', root, 'occluded_body_images', 'whole_body_images',
                         _PID_INDEX_NAME, '<pid>/<pid>_<k>.tif (or .jpg)', per_pid_folders=True)


@register('partial_reid')
def read_partial_reid(root: str, merge_train_val: bool = False) -> DatasetSplits:
  _no_merge('partial_reid', merge_train_val)
  return _read_test_only('partial_reid', root, 'partial_body_images', 'whole_body_images',
                         _PID_INDEX_NAME, '<pid>_<k>.jpg', per_pid_folders=False)


@register('partial_ilids')
def read_partial_ilids(root: str, merge_train_val: bool = False) -> DatasetSplits:
  _no_merge('partial_ilids', merge_train_val)
  return _read_test_only('partial_ilids', root, 'partial_body_images', 'whole_body_images',
                         _PID_NAME, '<pid>.jpg', per_pid_folders=False)


# ------------------------------------------------------------------------------------------------
# MSMT17: list files

_MSMT_FOLDERS = {'MSMT17_V1': ('train', 'test'), 'MSMT17_V2': ('mask_train_v2', 'mask_test_v2')}
_MSMT_LAYOUT = ('list_train.txt, list_val.txt, list_query.txt, list_gallery.txt and train/ + '
                'test/ (MSMT17_V1) or mask_train_v2/ + mask_test_v2/ (MSMT17_V2)')


def _msmt_image_folders(root: str) -> tuple[str, str]:
  """(train folder, test folder) of whichever MSMT17 release is present."""
  for version, (train, test) in _MSMT_FOLDERS.items():
    if os.path.isdir(os.path.join(root, train)):
      _require_dir('msmt17', root, test, f'{version}: {train}/ and {test}/')
      logging.info('msmt17: %s layout (%s/, %s/) in %s', version, train, test, root)
      return train, test
  raise DatasetNotFoundError(
      f"dataset 'msmt17': neither {os.path.join(root, 'train')} (MSMT17_V1) nor "
      f"{os.path.join(root, 'mask_train_v2')} (MSMT17_V2) exists (layout: {_MSMT_LAYOUT})"
      f'{_nesting_hint(root, "list_train.txt")}')


def _msmt_camera(relpath: str) -> Optional[int]:
  fields = os.path.splitext(os.path.basename(relpath))[0].split('_')
  if len(fields) < 3 or not fields[2].isdigit() or int(fields[2]) < 1:
    return None
  return int(fields[2])


def _walk_files(folder: str) -> tuple[set[str], int]:
  """Relative paths of all image files under folder, and the number of non-image files."""
  found: set[str] = set()
  stray = 0
  for dirpath, _, filenames in os.walk(folder):
    rel = os.path.relpath(dirpath, folder)
    for name in filenames:
      if _is_image_name(name):
        found.add(os.path.normpath(os.path.join(rel, name)))
      else:
        stray += 1
  return found, stray


def _read_msmt_list(list_path: str, image_folder: str,
                    existing: set[str]) -> tuple[list[str], list[int], list[int]]:
  paths, pids, camids = [], [], []
  missing: list[tuple[int, str]] = []
  with open(list_path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 2 or not re.fullmatch(r'-?\d+', fields[1]):
        raise DatasetError(f'{list_path}, line {lineno}: expected "<relative image path> <pid>", '
                         f'got {line.strip()!r}')
      relpath = fields[0]
      camid = _msmt_camera(relpath)
      if camid is None:
        raise DatasetError(f'{list_path}, line {lineno}: cannot read the camera from file name '
                         f'{os.path.basename(relpath)!r} (expected the 1-based camera as its '
                         f'third "_" field, e.g. 0000_011_01_0303morning_0015_0.jpg)')
      if os.path.normpath(relpath) not in existing:
        missing.append((lineno, relpath))
        continue
      paths.append(os.path.join(image_folder, os.path.normpath(relpath)))
      pids.append(int(fields[1]))
      camids.append(camid - 1)
  if missing:
    lineno, relpath = missing[0]
    more = f' ({len(missing) - 1} more entries are missing too)' if len(missing) > 1 else ''
    raise DatasetNotFoundError(f'{list_path}, line {lineno}: image '
                            f'{os.path.join(image_folder, relpath)} does not exist{more}')
  return paths, pids, camids


def _dedupe(paths: list[str], pids: list[int], camids: list[int],
            source: str) -> tuple[list[str], list[int], list[int]]:
  seen: dict[str, int] = {}
  out = ([], [], [])
  for path, pid, camid in zip(paths, pids, camids):
    if path in seen:
      if seen[path] != pid:
        raise DatasetError(f'{source}: {path} is listed with two pids, {seen[path]} and {pid}')
      continue
    seen[path] = pid
    out[0].append(path)
    out[1].append(pid)
    out[2].append(camid)
  return out


@register('msmt17')
def read_msmt17(root: str, merge_train_val: bool = False) -> DatasetSplits:
  """MSMT17 from its list files. With merge_train_val, list_val.txt joins the training set.

  The val list uses the same identity labels as the train list, so the merged ids are relabelled
  over their sorted union (an id present in both lists keeps one label).
  """
  train_dir, test_dir = (os.path.join(root, d) for d in _msmt_image_folders(root))
  lists = {name: _require_file('msmt17', root, f'list_{name}.txt', _MSMT_LAYOUT)
           for name in (('train', 'val', 'query', 'gallery') if merge_train_val
                        else ('train', 'query', 'gallery'))}
  ignored: dict[str, int] = {}
  existing = {}
  for folder in (train_dir, test_dir):
    existing[folder], stray = _walk_files(folder)
    if stray:
      ignored[os.path.basename(folder)] = stray
      logging.info('msmt17: ignoring %d non-image file(s) under %s', stray, folder)

  train = _read_msmt_list(lists['train'], train_dir, existing[train_dir])
  if merge_train_val:
    val = _read_msmt_list(lists['val'], train_dir, existing[train_dir])
    train = _dedupe(train[0] + val[0], train[1] + val[1], train[2] + val[2],
                    f'{lists["train"]} + {lists["val"]}')
  query = _read_msmt_list(lists['query'], test_dir, existing[test_dir])
  gallery = _read_msmt_list(lists['gallery'], test_dir, existing[test_dir])

  splits = {'train': _train_split(*train), 'query': _split(*query), 'gallery': _split(*gallery)}
  if not len(splits['train']):
    logging.warning('msmt17: %s lists no training images', lists['train'])
  for subset in ('query', 'gallery'):
    _require_nonempty('msmt17', lists[subset], splits[subset], subset,
                      'lines "<relative image path> <pid>"')
  return DatasetSplits(name='msmt17', root=root, ignored=ignored, **splits)

