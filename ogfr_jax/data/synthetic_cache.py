"""Writing a synthetic dataset to disk (worker processes) and the cache of finished folders.

A folder is keyed by the resolved config and the generator version; generation goes to a
temporary sibling that is renamed into place when whole, under a file lock so that processes
of one host draw it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ogfr_jax.data.synthetic_config import (BACKGROUND_STYLES, CLOTHING_PATTERNS,
                                            CLUTTER_TYPES, CONTAMINATION_TYPES,
                                            GENERATOR_VERSION, OCCLUDER_TYPES, SPLIT_DIRS,
                                            config_hash, resolve_config)
from ogfr_jax.data.synthetic_plan import Item, iter_images, plan

_JPEG_QUALITY = 95


def _stack_packed(packed: Sequence[np.ndarray], h: int, w: int) -> np.ndarray:
  """[N, H, ceil(W/8)] uint8: masks bit-packed along the width (np.unpackbits(..., count=W))."""
  if not packed:
    return np.zeros((0, h, (w + 7) // 8), np.uint8)
  return np.stack(packed)


@dataclasses.dataclass(frozen=True)
class _Written:
  """What the writer keeps of one image after saving it."""
  item: Item
  occluder: str | None
  placement: str | None
  occluder_bits: np.ndarray | None  # packed along the width
  clutter: str | None
  clutter_bits: np.ndarray | None
  cutout_box: tuple[int, int, int, int] | None = None  # (y0, x0, y1, x1) of a bank cut-out


OCCLUDER_BANK_DIR = 'occluders'


def _save_cutout(image: np.ndarray, mask: np.ndarray, path: str
                 ) -> tuple[int, int, int, int] | None:
  """Writes the masked pixels of image, cropped to the mask's box, as an RGBA PNG."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if not rows.size:
    return None
  y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
  alpha = (mask[y0:y1, x0:x1] > 0).astype(np.uint8) * 255
  Image.fromarray(np.dstack([image[y0:y1, x0:x1], alpha]), 'RGBA').save(path)
  return y0, x0, y1, x1


def _write_items(p: dict[str, Any], root: str, items: Sequence[Item]) -> list[_Written]:
  out = []
  for item, r in iter_images(p, items):
    Image.fromarray(r.image).save(os.path.join(root, SPLIT_DIRS[item.split], item.name),
                                  quality=_JPEG_QUALITY)
    box = None
    if item.split == 'train' and r.occluder_mask is not None:
      visible = r.occluder_mask if r.clutter_mask is None else (r.occluder_mask
                                                               & ~r.clutter_mask.astype(bool))
      box = _save_cutout(r.image, visible, os.path.join(
          root, OCCLUDER_BANK_DIR, os.path.splitext(item.name)[0] + '.png'))
    out.append(_Written(
        item, r.occluder, r.placement,
        None if r.occluder_mask is None else np.packbits(r.occluder_mask, axis=-1),
        r.clutter, None if r.clutter_mask is None else np.packbits(r.clutter_mask, axis=-1),
        box))
  return out


def _default_workers(num_images: int) -> int:
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cpus = os.cpu_count() or 1
  # Starting a worker costs about a second, so small sets are drawn in this process.
  return max(1, min(cpus, 8, num_images // 2000))


def generate(root: str, cfg: Any, workers: int | None = None) -> str:
  """Writes the benchmark into root (absent or empty) and returns root.

  workers > 1 draws chunks of images in that many processes (default: one per 2000 images, at
  most 8 and at most the CPUs available); the output does not depend on it. meta.json is
  written last, so a folder with meta.json is a finished dataset.
  """
  p = resolve_config(cfg)
  if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
    raise FileExistsError(f'synthetic dataset target {root!r} exists and is not an empty folder')
  for d in list(SPLIT_DIRS.values()) + [OCCLUDER_BANK_DIR]:
    os.makedirs(os.path.join(root, d), exist_ok=True)
  items = plan(p)
  workers = _default_workers(len(items)) if workers is None else int(workers)
  if workers > 1:
    # Spawned, not forked: the caller may hold JAX or grain threads that a fork would break.
    import concurrent.futures  # noqa: PLC0415
    import multiprocessing  # noqa: PLC0415
    chunk = -(-len(items) // (4 * workers))
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn')) as pool:
      written = [w for part in pool.map(_write_items, [p] * len(chunks), [root] * len(chunks),
                                        chunks) for w in part]
  else:
    written = _write_items(p, root, items)

  h, w = p['height'], p['width']
  occ = {'names': [], 'splits': [], 'types': [], 'placements': [], 'masks': []}
  clut = {'names': [], 'splits': [], 'types': [], 'sources': [], 'masks': []}
  # 'clutter' and 'contaminated' count the same images (the first is version 2's name).
  counts = {s: {'images': 0, 'ids': set(), 'cameras': set(), 'occluded': 0, 'clutter': 0,
                'contaminated': 0, 'distractors': 0} for s in SPLIT_DIRS}
  for r in written:
    item = r.item
    c = counts[item.split]
    c['images'] += 1
    c['cameras'].add(item.cam)
    if item.pid > 0:
      c['ids'].add(item.pid)
    else:
      c['distractors'] += 1
    if r.occluder is not None:
      c['occluded'] += 1
      occ['names'].append(item.name)
      occ['splits'].append(item.split)
      occ['types'].append(r.occluder)
      occ['placements'].append(r.placement)
      occ['masks'].append(r.occluder_bits)
    if r.clutter is not None:
      c['clutter'] += 1
      c['contaminated'] += 1
      clut['names'].append(item.name)
      clut['splits'].append(item.split)
      clut['types'].append(r.clutter)
      clut['sources'].append(item.source)
      clut['masks'].append(r.clutter_bits)
  bank = {os.path.splitext(r.item.name)[0] + '.png': {
      'type': r.occluder, 'box': [round(v, 4) for v in (r.cutout_box[0] / h, r.cutout_box[1] / w,
                                                       r.cutout_box[2] / h, r.cutout_box[3] / w)]}
          for r in written if r.cutout_box is not None}
  with open(os.path.join(root, OCCLUDER_BANK_DIR, 'index.json'), 'w') as f:
    json.dump(bank, f, indent=0, sort_keys=True)
  np.savez_compressed(os.path.join(root, 'masks.npz'), names=np.array(occ['names'], str),
                      splits=np.array(occ['splits'], str), types=np.array(occ['types'], str),
                      placements=np.array(occ['placements'], str),
                      masks=_stack_packed(occ['masks'], h, w), height=h, width=w)
  np.savez_compressed(os.path.join(root, 'clutter.npz'), names=np.array(clut['names'], str),
                      splits=np.array(clut['splits'], str), types=np.array(clut['types'], str),
                      sources=np.array(clut['sources'], np.int32),
                      masks=_stack_packed(clut['masks'], h, w), height=h, width=w)
  meta = {
      'generator_version': GENERATOR_VERSION,
      'config_hash': config_hash(p),
      'config': p,
      'occluder_types': list(OCCLUDER_TYPES),
      'clothing_patterns': list(CLOTHING_PATTERNS),
      'clutter_types': list(CLUTTER_TYPES),
      'contamination_types': list(CONTAMINATION_TYPES),
      'background_styles': list(BACKGROUND_STYLES),
      'split_dirs': SPLIT_DIRS,
      'counts': {s: {k: (len(v) if isinstance(v, set) else v) for k, v in c.items()}
                 for s, c in counts.items()},
  }
  tmp = os.path.join(root, 'meta.json.part')
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, os.path.join(root, 'meta.json'))
  return root

# --------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> str:
  base = os.environ.get('OGFR_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                          'ogfr_jax')
  return os.path.join(base, 'synthetic')


def _regenerate_hint(folder: str) -> str:
  return (f'to regenerate it, delete {folder}, or point config.dataset.root at another folder '
          "(or leave it '' for the default cache, $OGFR_JAX_CACHE or "
          '~/.cache/ogfr_jax/synthetic), where the dataset is generated on first use')


def _read_meta(folder: str) -> dict | None:
  """meta.json of a finished dataset folder, or None where folder holds none."""
  meta_path = os.path.join(folder, 'meta.json')
  if not os.path.isfile(meta_path):
    return None
  with open(meta_path) as f:
    return json.load(f)


def check_version(folder: str, meta: Mapping[str, Any]) -> None:
  """Raises when the dataset in folder was drawn by another generator version: its images,
  side files and protocol differ from what this code's configs describe."""
  version = str(meta.get('generator_version'))
  if version != GENERATOR_VERSION:
    raise RuntimeError(
        f'{folder} holds a synthetic dataset of generator version {version}, but this code '
        f'draws version {GENERATOR_VERSION} (configs of one version do not describe the '
        f'other\'s images, contamination or side files); {_regenerate_hint(folder)}')


def _is_complete(folder: str, key: str) -> bool:
  meta = _read_meta(folder)
  if meta is None:
    return False
  check_version(folder, meta)
  if meta.get('config_hash') != key:
    raise RuntimeError(f'{folder} holds a synthetic dataset of another config '
                       f'({meta.get("config_hash")} != {key}); delete the folder')
  return True


@contextlib.contextmanager
def _file_lock(path: str):
  """Exclusive lock so that processes on one host generate once; a no-op where unsupported.

  Correctness does not depend on it (the final rename decides); it only saves duplicate work.
  """
  try:
    import fcntl  # noqa: PLC0415 (POSIX only)
  except ImportError:
    yield
    return
  with open(path, 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:  # e.g. a network file system without locks
      yield
      return
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _remove_dead_temps(cache_dir: str, name: str) -> None:
  """Deletes temp folders of killed generations started on this host (their pid is gone)."""
  host = socket.gethostname()
  prefix = f'.{name}.tmp.'
  for entry in os.listdir(cache_dir):
    if not entry.startswith(prefix):
      continue
    parts = entry[len(prefix):].split('.')
    if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
      continue
    try:
      os.kill(int(parts[1]), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(cache_dir, entry), ignore_errors=True)
    except OSError:
      pass  # alive but not ours


def ensure(cfg: Any, cache_dir: str | None = None) -> str:
  """Returns the folder of the dataset for cfg under cache_dir, generating it if missing.

  The folder name holds a hash of the resolved config and the generator version. Generation
  goes to a temporary sibling folder that is renamed into place when complete, so a killed run
  never leaves a folder that looks finished, and concurrent callers (several processes of one
  job) are safe: whoever loses the rename race uses the winner's folder.

  cache_dir may also be a dataset folder itself (config.dataset.root pointing at a generated
  dataset): it is used when it holds this config's dataset of this generator version, and
  refused, naming the version or the config and how to regenerate, otherwise.
  """
  key = config_hash(cfg)
  cache_dir = cache_dir or default_cache_dir()
  own = _read_meta(cache_dir) if os.path.isdir(cache_dir) else None
  if own is not None:
    check_version(cache_dir, own)
    if own.get('config_hash') != key:
      raise RuntimeError(f'{cache_dir} holds a synthetic dataset of another config '
                         f'({own.get("config_hash")} != {key}: see its meta.json); '
                         f'{_regenerate_hint(cache_dir)}')
    return cache_dir
  name = f'synthetic-v{GENERATOR_VERSION}-{key}'
  target = os.path.join(cache_dir, name)
  if _is_complete(target, key):
    return target
  os.makedirs(cache_dir, exist_ok=True)
  with _file_lock(os.path.join(cache_dir, f'.{name}.lock')):
    if _is_complete(target, key):
      return target
    _remove_dead_temps(cache_dir, name)
    tmp = tempfile.mkdtemp(prefix=f'.{name}.tmp.{socket.gethostname()}.{os.getpid()}.',
                           dir=cache_dir)
    try:
      generate(tmp, cfg)
      try:
        os.rename(tmp, target)
      except OSError:
        if not _is_complete(target, key):
          raise RuntimeError(f'cannot move the generated dataset into {target}: the folder '
                             'exists but is not a finished dataset; delete it') from None
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return target


# --------------------------------------------------------------------------------------------
# Side information and token scoring
