"""The rehearsal's inputs: a dataset of a real benchmark's counts in the Occluded-Duke layout,
drawn by the embedded generator's renderer, and a ViT state dict in timm's names.

benchmarks/rehearsal.py runs the rehearsal; this module makes what it reads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ogfr_jax.data import synthetic  # noqa: E402  pylint: disable=g-import-not-at-top

LAYOUT_DIR = 'Occluded_Duke'
SPLIT_FOLDERS = {'train': 'bounding_box_train', 'query': 'query', 'gallery': 'bounding_box_test'}
DATA_MARKER = 'rehearsal_data.json'
OCCLUDED_TRAIN_SHARE = 0.14  # Occluded-Duke's training set
OCCLUDED_GALLERY_SHARE = 0.1


@dataclasses.dataclass(frozen=True)
class Counts:
  train_ids: int
  train_images: int
  query_ids: int
  query_images: int
  gallery_ids: int  # the query ids first, then gallery-only identities
  gallery_images: int
  cameras: int


PRESETS = {
    'occluded_duke': Counts(702, 15618, 519, 2210, 1110, 17661, 8),
    'market1501': Counts(751, 12936, 750, 3368, 751, 19732, 6),
    'msmt17': Counts(1041, 32621, 3060, 11659, 3060, 82161, 15),
}


def log(msg: str) -> None:
  print(f'[rehearsal {time.strftime("%H:%M:%S")}] {msg}', flush=True)


# --------------------------------------------------------------------------------------------
# Data


def _spread(total: int, parts: int) -> list[int]:
  base, extra = divmod(total, parts)
  return [base + (i < extra) for i in range(parts)]


def plan_items(counts: Counts, seed: int) -> list[tuple[str, str, synthetic.Item]]:
  """(split, file name, generator item) of every image, in the Occluded-Duke names.

  Rendering draws from the generator's streams keyed by (seed, split, index), identities by
  pid; cameras beyond the generator's 9 reuse a drawn camera's look (cam % 9) and keep their
  own number in the name.
  """
  c = counts
  if c.query_ids > c.gallery_ids:
    raise ValueError(f'--query-ids ({c.query_ids}) exceeds --gallery-ids ({c.gallery_ids}): '
                     'every query identity needs gallery images')
  for name in ('train', 'query', 'gallery'):
    if getattr(c, f'{name}_images') < getattr(c, f'{name}_ids'):
      raise ValueError(f'--{name}-images must be at least --{name}-ids')
  if c.cameras < 2:
    raise ValueError('--cameras must be at least 2: queries and gallery need different cameras')
  if c.train_ids + c.gallery_ids > 9999:
    raise ValueError('--train-ids + --gallery-ids must be at most 9999 (four-digit pids)')
  rng = np.random.default_rng([seed, 900])
  render_cams = min(c.cameras, 9)
  out = []
  index = {'train': 0, 'query': 0, 'gallery': 0}

  def add(split: str, pid: int, cam: int, occluder: str | None) -> None:
    i = index[split]
    index[split] += 1
    item = synthetic.Item(split, i, pid, cam % render_cams, occluder, None)
    out.append((split, f'{pid:04d}_c{cam + 1}_f{i + 1:07d}.jpg', item))

  def occluders(n: int, share: float) -> list[str | None]:
    flags = rng.random(n) < share
    return [synthetic.OCCLUDER_TYPES[rng.integers(len(synthetic.OCCLUDER_TYPES))] if f else None
            for f in flags]

  def cameras_of(n: int, allowed: np.ndarray) -> np.ndarray:
    k = int(rng.integers(1, len(allowed) + 1)) if len(allowed) > 1 else 1
    cams = rng.choice(allowed, k, replace=False)
    return rng.permutation(cams[np.arange(n) % k])

  everyone = np.arange(c.cameras)
  for pid, n in zip(range(1, c.train_ids + 1), _spread(c.train_images, c.train_ids)):
    for cam, occ in zip(cameras_of(n, everyone), occluders(n, OCCLUDED_TRAIN_SHARE)):
      add('train', pid, int(cam), occ)
  first_test = c.train_ids + 1
  query_cam = {}
  for pid, n in zip(range(first_test, first_test + c.query_ids),
                    _spread(c.query_images, c.query_ids)):
    query_cam[pid] = int(rng.integers(c.cameras))
    for _ in range(n):  # every query occluded, as in Occluded-Duke
      add('query', pid, query_cam[pid],
          synthetic.OCCLUDER_TYPES[rng.integers(len(synthetic.OCCLUDER_TYPES))])
  for pid, n in zip(range(first_test, first_test + c.gallery_ids),
                    _spread(c.gallery_images, c.gallery_ids)):
    allowed = everyone[everyone != query_cam[pid]] if pid in query_cam else everyone
    for cam, occ in zip(cameras_of(n, allowed), occluders(n, OCCLUDED_GALLERY_SHARE)):
      add('gallery', pid, int(cam), occ)
  return out


def _render_config(counts: Counts, seed: int, height: int, width: int) -> dict:
  return dict(seed=seed, num_train_ids=1, num_test_ids=1, images_per_id=2,
              num_cameras=min(counts.cameras, 9), height=height, width=width,
              clutter_fraction=0.0, occluded_query_fraction=1.0,
              contaminated_gallery_fraction=0.0)


def _write_chunk(cfg: dict, root: str, entries: list) -> int:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  by_item = {id(item): (split, name) for split, name, item in entries}
  n = 0
  for item, rendered in synthetic.iter_images(cfg, [e[2] for e in entries]):
    split, name = by_item[id(item)]
    Image.fromarray(rendered.image).save(os.path.join(root, SPLIT_FOLDERS[split], name),
                                         quality=95)
    n += 1
  return n


def cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def ensure_dataset(counts: Counts, seed: int, height: int, width: int, cache_dir: str,
                   workers: int) -> tuple[str, float | None]:
  """(<folder>/Occluded_Duke, seconds spent drawing it or None when cached)."""
  spec = {'counts': dataclasses.asdict(counts), 'seed': seed, 'height': height, 'width': width,
          'generator_version': synthetic.GENERATOR_VERSION, 'layout': 'occluded_duke'}
  key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
  folder = os.path.join(cache_dir, f'data-{key}')
  root = os.path.join(folder, LAYOUT_DIR)
  if os.path.isfile(os.path.join(folder, DATA_MARKER)):
    return root, None
  os.makedirs(cache_dir, exist_ok=True)
  entries = plan_items(counts, seed)
  tmp = tempfile.mkdtemp(prefix=f'.data-{key}.tmp.', dir=cache_dir)
  t0 = time.perf_counter()
  try:
    for d in SPLIT_FOLDERS.values():
      os.makedirs(os.path.join(tmp, LAYOUT_DIR, d))
    cfg = _render_config(counts, seed, height, width)
    chunk = 500
    chunks = [entries[i:i + chunk] for i in range(0, len(entries), chunk)]
    log(f'drawing {len(entries):,} images at {height}x{width} with {workers} worker '
         f'process(es) into {folder}')
    done, last = 0, time.perf_counter()
    if workers > 1:
      # Spawned: a fork would copy whatever threads this process holds.
      with concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context('spawn')) as pool:
        futures = [pool.submit(_write_chunk, cfg, os.path.join(tmp, LAYOUT_DIR), part)
                   for part in chunks]
        for f in concurrent.futures.as_completed(futures):
          done += f.result()
          if time.perf_counter() - last > 30:
            log(f'  {done:,} / {len(entries):,} images')
            last = time.perf_counter()
    else:
      for part in chunks:
        done += _write_chunk(cfg, os.path.join(tmp, LAYOUT_DIR), part)
        if time.perf_counter() - last > 30:
          log(f'  {done:,} / {len(entries):,} images')
          last = time.perf_counter()
    seconds = time.perf_counter() - t0
    with open(os.path.join(tmp, DATA_MARKER), 'w') as f:
      json.dump(dict(spec, images=len(entries), seconds=round(seconds, 1)), f, indent=1)
    try:
      os.rename(tmp, folder)
    except OSError:
      if not os.path.isfile(os.path.join(folder, DATA_MARKER)):
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return root, seconds


def make_view(root: str, view: str, n_query: int, n_gallery: int) -> tuple[int, int]:
  """A dataset folder whose training folder is root's and whose query / gallery hold the first
  n_query queries (by identity) and n_gallery gallery images, their matches first (links)."""
  if os.path.exists(view):
    shutil.rmtree(view)
  os.makedirs(view)
  os.symlink(os.path.join(root, SPLIT_FOLDERS['train']),
             os.path.join(view, SPLIT_FOLDERS['train']))
  queries = sorted(os.listdir(os.path.join(root, SPLIT_FOLDERS['query'])))[:n_query]
  pids = {q.split('_')[0] for q in queries}
  gallery = sorted(os.listdir(os.path.join(root, SPLIT_FOLDERS['gallery'])))
  gallery = ([g for g in gallery if g.split('_')[0] in pids]
             + [g for g in gallery if g.split('_')[0] not in pids])[:n_gallery]
  for split, names in (('query', queries), ('gallery', gallery)):
    os.makedirs(os.path.join(view, SPLIT_FOLDERS[split]))
    for n in names:
      os.symlink(os.path.join(root, SPLIT_FOLDERS[split], n),
                 os.path.join(view, SPLIT_FOLDERS[split], n))
  return len(queries), len(gallery)


# --------------------------------------------------------------------------------------------
# Weights


def write_timm_vit(path: str, size: str, seed: int) -> int:
  """A timm `vit_*_patch16_224` state dict with random values (safetensors); returns bytes.

  The tree comes from the model's own builder at 224x224 stride 16 and is renamed by
  `pretrained.vit_to_timm`, the inverse of the import's mapping."""
  import jax  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from ogfr_jax import pretrained  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_state  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top

  c = config_defaults.base_config()
  c.model.size, c.model.patch_size, c.model.stride = size, 16, 16
  c.input.height = c.input.width = 224
  model = build.build_model(c, 2, 2)
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.PRNGKey(0)}, train_state.dummy_batch(c, 1), train=False))['params']
  rng = np.random.default_rng(seed)
  vit = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)),
                     shapes['student_vit'])
  tensors = pretrained.vit_to_timm(vit)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(tensors, path)
  return os.path.getsize(path)
