"""Throughput of feature extraction (`ogfr_jax.tools.extract`) on this machine.

Writes a folder of JPEGs at each model's input size, builds the student with random weights
(speed does not depend on the values; no checkpoint is needed), and times
`extract.extract_folder` -- decoding threads, normalisation, the jitted student, L2
normalisation -- after an untimed warm-up pass that compiles. It also times the two halves
alone: decoding only (the same thread pool) and the model only (pre-decoded batches).

  python benchmarks/extract_speed.py                    # tiny (synthetic config) and ViT-S
  python benchmarks/extract_speed.py --models=tiny --images=1024 --batch_size=128

Models: 'tiny' is configs/synthetic.py (width 64, depth 2, 128x64, stride 12); 'small' and
'base' are the recipe's 256x128 at stride 12 with ViT-S / ViT-B.

Measured on the 2-core development VM while other jobs kept its load average at 8-9, so the
figures vary by about 2x between runs (images/s; whole extraction / decoding only / model only):
  python benchmarks/extract_speed.py
  tiny   128x64,  512 images:  860-1317 / 2305-3664 / 1167-3100
  small  256x128, 128-192 images:  2.8-4.4 / 885-1406 / 3.3-5.3
The ViT-S student costs about 10 GFLOP per image (211 tokens), so on a CPU the model is the
whole cost and decoding (PIL, threads) is two orders of magnitude faster.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

from ogfr_jax import config_defaults
from ogfr_jax import evaluate
from ogfr_jax.data import augment
from ogfr_jax.data import image_io
from ogfr_jax.models import build
from ogfr_jax.models import ogfr as ogfr_lib
from ogfr_jax.tools import extract

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import synthetic  # noqa: E402  pylint: disable=g-import-not-at-top

_MODELS = flags.DEFINE_list('models', ['tiny', 'small'], 'tiny, small and/or base.')
_IMAGES = flags.DEFINE_integer('images', 0, 'timed images per model (0: 512 for tiny, 128 '
                               'otherwise).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'extraction batch.')
_THREADS = flags.DEFINE_integer('decode_threads', 0, 'decoding threads (0: CPU count).')


def model_config(name: str):
  if name == 'tiny':
    return synthetic.get_config()
  if name not in ('small', 'base'):
    raise ValueError(f'--models: unknown model {name!r}; use tiny, small or base')
  c = config_defaults.base_config()
  c.model.size = name
  return c


def write_jpegs(folder: str, count: int, size: tuple[int, int]) -> list[str]:
  """`count` noisy JPEGs of (height, width) = size; returns their file names."""
  rng = np.random.default_rng(0)
  names = []
  h, w = size
  for i in range(count):
    base = rng.integers(0, 256, size=(1, 1, 3))
    noise = rng.integers(0, 64, size=(h, w, 3))
    Image.fromarray(((base * 3 // 4) + noise).astype(np.uint8)).save(
        os.path.join(folder, f'{i:05d}.jpg'), quality=90)
    names.append(f'{i:05d}.jpg')
  return names


def student(config):
  """(model, random variables) of the student only: extract's path through the model."""
  model = build.build_model(config, num_classes=100, num_cameras=8)
  h, w = config.input.height, config.input.width
  init = jax.jit(lambda key: model.init({'params': key}, np.zeros((1, h, w, 3), np.float32),
                                        np.zeros((1,), np.int32), method=ogfr_lib.OGFR.extract))
  return model, init(jax.random.PRNGKey(0))


def time_decode(folder: str, names: list[str], size, threads: int) -> float:
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
    list(pool.map(lambda n: image_io.load_image(os.path.join(folder, n), size=size), names))
  return len(names) / (time.perf_counter() - start)


def time_model(model, variables, config, batch: int, count: int) -> float:
  fn = jax.jit(lambda v, x, c: evaluate.student_features(model, v, x, c, eval_cfg=config.eval))
  h, w = config.input.height, config.input.width
  x = augment.normalize(np.random.default_rng(1).integers(0, 256, (batch, h, w, 3),
                                                             dtype=np.uint8),
                        config.input.mean, config.input.std)
  c = np.zeros((batch,), np.int32)
  fn(variables, x, c).block_until_ready()
  steps = max(1, count // batch)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(variables, x, c)
  out.block_until_ready()
  return steps * batch / (time.perf_counter() - start)


def main(argv):
  del argv
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}, '
        f'{os.cpu_count()} CPU threads; batch {_BATCH.value}; random-init weights')
  for name in _MODELS.value:
    config = model_config(name)
    size = (int(config.input.height), int(config.input.width))
    count = _IMAGES.value or (512 if name == 'tiny' else 128)
    model, variables = student(config)
    with tempfile.TemporaryDirectory() as folder:
      names = write_jpegs(folder, count, size)
      extractor = extract.Extractor(model, variables, config, _BATCH.value)
      run = lambda subset: extract.extract_folder(  # noqa: E731
          extractor, folder, names=subset, progress=False, decode_threads=_THREADS.value)
      run(names[:_BATCH.value])  # compiles
      start = time.perf_counter()
      result = run(names)
      whole = count / (time.perf_counter() - start)
      decode = time_decode(folder, names, size, _THREADS.value)
    compute = time_model(model, variables, config, _BATCH.value, count)
    print(f'{name:5s} {size[0]}x{size[1]} stride {config.model.stride}, '
          f'{result.features.shape[1]}-d: {whole:7.1f} img/s extract  |  '
          f'{decode:7.1f} img/s decode only  |  {compute:7.1f} img/s model only  '
          f'({count} images)')


if __name__ == '__main__':
  app.run(main)
