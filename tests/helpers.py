"""Test configs and small shared helpers.

`make_config` is the one way tests build a config: a named preset, then dotted-name overrides
(`{'model.jpm': True, 'seed': 3}`). tests/conftest.py re-exports these names; the child scripts
(separate processes with tests/ on sys.path) import them from here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Image size of the JPEG splits `write_split` writes and of the `tiny` and `loader` presets.
H, W = 32, 16

_TINY = {
    'model.size': 'tiny',
    'input.height': H, 'input.width': W,
    'model.patch_size': 8, 'model.stride': 6,  # overlapping: a 5 x 2 grid
    'model.drop_path': 0.0,
    'fepm.consistency_memory': 0,  # the identity memory needs the batch's 'index'
}

# The input pipeline on 8-image batches of 32 x 16, in the test process (no grain workers).
_LOADER = {
    'input.height': H, 'input.width': W,
    'input.ids_per_batch': 4, 'input.images_per_id': 2,
    'input.pad': 2,
    'input.num_workers': 0,
}
_PIPELINE = {**_LOADER, 'seed': 3, 'input.prefetch': 1, 'input.eval_batch_size': 4}

# The README run (configs/synthetic.py runlocal) shrunk to a few seconds: 3 steps of 8 images
# of 64 x 32, a checkpoint at step 3, evaluation only at the end.
_SYNTHETIC = {
    'synthetic.num_train_ids': 8, 'synthetic.num_test_ids': 6,
    'synthetic.images_per_id': 6,
    'synthetic.height': 64, 'synthetic.width': 32,
    'input.height': 64, 'input.width': 32,
    'model.patch_size': 16, 'model.stride': 16,
    'input.ids_per_batch': 4, 'input.images_per_id': 2,
    'input.eval_batch_size': 16,
    'train.epochs': 1,
    'train.steps_per_epoch': 3,
    'train.log_every': 1,
    'train.checkpoint_every': 3,
    'train.eval_every_epochs': 100,
}

# The synthetic preset reading a tiny Market-1501 tree (dataset_fixtures.make_market1501) as a
# whole epoch of 32 x 16 images; no occluder bank there.
MARKET = {
    'dataset.name': 'market1501',
    'input.height': 32, 'input.width': 16,
    'input.ids_per_batch': 4, 'input.images_per_id': 2,
    'model.patch_size': 8, 'model.stride': 8,
    'train.steps_per_epoch': 0,
    'occlusion.patterns': ('object', 'texture', 'person', 'crop'),
}

PRESETS = ('base', 'tiny', 'loader', 'pipeline', 'synthetic')


def set_fields(config, overrides: Optional[dict[str, Any]]):
  """Sets each dotted name (`'input.height'`, `'seed'`) of `overrides` on `config`."""
  for name, value in (overrides or {}).items():
    *sections, field = name.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


def make_config(overrides: Optional[dict[str, Any]] = None, *, preset: str = 'base',
                cache: Optional[str | os.PathLike] = None, extend: Sequence[str] = ()):
  """A config from a preset, with the extension sections `extend` added (config_defaults.
  EXTENSIONS, at their defaults) and `overrides` (dotted names) set on it.

  Presets: 'base' (config_defaults.base_config()); 'tiny' (a tiny ViT on 32 x 16 images, a
  5 x 2 token grid, no stochastic depth or identity memory); 'loader' (the input pipeline on
  8-image batches of 32 x 16 in the test process); 'pipeline' (the loader with seed 3, one
  prefetched batch and eval batches of 4); 'synthetic' (the synthetic runlocal run shrunk to 3
  steps, its dataset cached in `cache`, which it requires; the preset is validated before the
  overrides are set, so a test may build an invalid config on it).
  """
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  if preset not in PRESETS:
    raise ValueError(f'make_config: unknown preset {preset!r} (one of {", ".join(PRESETS)})')
  if (cache is None) != (preset != 'synthetic'):
    raise ValueError("make_config: cache is required by preset 'synthetic' and only by it")
  if preset == 'synthetic':
    if ROOT not in sys.path:
      sys.path.insert(0, ROOT)
    from configs import synthetic  # pylint: disable=g-import-not-at-top
    from ogfr_jax import run_config  # pylint: disable=g-import-not-at-top
    c = synthetic.get_config('runlocal')
    c.dataset.root = str(cache)
    set_fields(c, _SYNTHETIC)
    run_config.validate(c)
  else:
    c = config_defaults.base_config()
    set_fields(c, {'tiny': _TINY, 'loader': _LOADER, 'pipeline': _PIPELINE}.get(preset))
  for name in extend:
    config_defaults.extend(c, name)
  return set_fields(c, overrides)


def write_split(folder, counts, seed=0):
  """JPEGs named as in DukeMTMC (`0001_c2_f0046182.jpg`), pids already 0..N-1."""
  from ogfr_jax.data import records  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths, pids, camids = [], [], []
  for pid, count in enumerate(counts):
    base = rng.integers(0, 256, size=3)
    for k in range(count):
      pixels = np.clip(base + rng.integers(-40, 41, size=(48, 24, 3)), 0, 255).astype(np.uint8)
      path = os.path.join(folder, f'{pid + 1:04d}_c{k % 3 + 1}_f{k:07d}.jpg')
      Image.fromarray(pixels).save(path, quality=90)
      paths.append(path)
      pids.append(pid)
      camids.append(k % 3)
  return records.Split.from_lists(paths, pids, camids)


def take(it, n):
  return [next(it) for _ in range(n)]


def float32_feature_tol(config, computations: int = 1) -> float:
  """Bound on the float32 rounding error of a unit-norm ViT feature of `config`, against the
  exact value (computations=1) or between two float32 computations of it (2) that may sum in
  other orders (another batch size, program, machine or thread count).

  Each stage (the patch embedding, then each of the depth blocks) ends in dot products of
  length at most n = max(3 p^2, 4 D), each within gamma_n ~ n u (u = 2^-24) of exact relative
  to the sum of its terms' magnitudes, for any summation order (Higham, Accuracy and Stability
  of Numerical Algorithms, Thm 3.1). LayerNorm rescales each stage's output to unit scale, so
  the relative errors of the depth + 1 stages add; a factor 4 covers the sum of |terms|
  exceeding the result (cancellation) and the softmax and GELU roundings.
  """
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  dim, depth, _ = build.vit_size(config)
  n = max(3 * int(config.model.patch_size) ** 2, 4 * dim)
  return computations * 4 * (depth + 1) * n * 2.0 ** -24


def wait_for(condition, timeout: float, what: str) -> None:
  """Polls `condition` until it holds; AssertionError naming `what` after `timeout` s."""
  deadline = time.time() + timeout
  while not condition():
    if time.time() > deadline:
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.01)


def run_main(*args) -> subprocess.CompletedProcess:
  """`python -m ogfr_jax.main ARGS` from the repository root on the CPU, output captured."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, '-m', 'ogfr_jax.main', *map(str, args)], cwd=root,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
