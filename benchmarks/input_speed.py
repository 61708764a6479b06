"""Throughput of the train input pipeline (decode, augment, occlusion synthesis).

Generates a folder of JPEGs (identities of noisy colour blocks and shapes, Market-1501 file
names and size by default), then times `make_train_iterator` at the recipe's 256x128 with
P x K = 16 x 4 for each requested worker count. Warm-up batches (worker start-up included) are
not timed. Each train image counts once although it yields both x and occ(x). Batches hold
uint8 pixels (normalised later, on the device); the bytes of one batch's image + occluded
arrays, what crosses to the devices, are printed too.

With --device, each worker count is also timed through what the train loop runs: the
iterator behind `prefetch.DevicePrefetcher` (config.input.device_prefetch batches ahead) that
puts the step's keys on all local devices as global arrays, each batch waited for.

  python benchmarks/input_speed.py                       # workers 0 and 2
  python benchmarks/input_speed.py --workers=0,2,4 --batches=40 --device
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw

from ogfr_jax import config_defaults
from ogfr_jax.data import pipeline
from ogfr_jax.data import records

_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'grain worker counts to time.')
_BATCHES = flags.DEFINE_integer('batches', 30, 'timed batches per worker count.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'untimed batches first (includes worker start).')
_IDS = flags.DEFINE_integer('ids', 64, 'identities in the generated folder.')
_PER_ID = flags.DEFINE_integer('per_id', 8, 'images per identity.')
_SOURCE = flags.DEFINE_string('source_size', '128x64', 'HxW of the generated JPEGs.')
_TARGET = flags.DEFINE_string('size', '256x128', 'HxW the pipeline produces.')
_DEVICE = flags.DEFINE_bool('device', False, 'also time batches prefetched onto the devices.')


def _hw(text: str) -> tuple[int, int]:
  h, _, w = text.partition('x')
  return int(h), int(w)


def write_folder(folder: str, ids: int, per_id: int, size: tuple[int, int]) -> records.Split:
  """Writes `ids` x `per_id` JPEGs named like Market-1501 and returns them as a split."""
  rng = np.random.default_rng(0)
  h, w = size
  paths, pids, camids = [], [], []
  for pid in range(ids):
    colours = rng.integers(0, 256, size=(3, 3))
    for k in range(per_id):
      noise = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
      im = Image.fromarray(noise // 4 + (colours[0] * 3 // 4).astype(np.uint8))
      draw = ImageDraw.Draw(im)
      draw.rectangle((w // 4, h // 5, 3 * w // 4, h // 2), fill=tuple(int(c) for c in colours[1]))
      draw.rectangle((w // 4, h // 2, 3 * w // 4, h - 4), fill=tuple(int(c) for c in colours[2]))
      draw.ellipse((3 * w // 8, 2, 5 * w // 8, h // 5), fill=(220, 180, 150))
      cam = k % 6
      path = os.path.join(folder, f'{pid + 1:04d}_c{cam + 1}s1_{k:06d}_00.jpg')
      im.save(path, quality=90)
      paths.append(path)
      pids.append(pid)
      camids.append(cam)
  return records.Split.from_lists(paths, pids, camids)


def time_pipeline(split: records.Split, config, batches: int, warmup: int,
                  device: bool = False) -> float:
  """Images per second over `batches` batches after `warmup` untimed ones; with `device`,
  through the train loop's device prefetcher, waiting for each batch to be on the devices."""
  it = pipeline.make_train_iterator(split, config)
  if device:
    import functools  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
    from ogfr_jax import prefetch  # pylint: disable=g-import-not-at-top
    from ogfr_jax import train  # pylint: disable=g-import-not-at-top
    mesh = parallel.make_mesh(config.mesh)
    it = prefetch.DevicePrefetcher(it, functools.partial(train._to_devices, mesh=mesh),  # pylint: disable=protected-access
                                   size=int(config.input.device_prefetch))
    take = lambda: jax.block_until_ready(next(it))
  else:
    take = lambda: next(it)
  try:
    for _ in range(warmup):
      take()
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
      n += take()['image'].shape[0]
    return n / (time.perf_counter() - start)
  finally:
    it.close()


def main(argv):
  del argv
  config = config_defaults.base_config()
  config.input.height, config.input.width = _hw(_TARGET.value)
  config.input.prefetch = 2
  with tempfile.TemporaryDirectory() as folder:
    split = write_folder(folder, _IDS.value, _PER_ID.value, _hw(_SOURCE.value))
    batch = config.input.ids_per_batch * config.input.images_per_id
    h, w = _hw(_TARGET.value)
    pixels = 2 * batch * h * w * 3  # image + occluded
    print(f'{len(split)} JPEGs of {_SOURCE.value} -> {_TARGET.value}, batch {batch} '
          f'({config.input.ids_per_batch} x {config.input.images_per_id}), occlusion prob '
          f'{config.occlusion.prob}, {os.cpu_count()} CPUs, load average '
          f'{os.getloadavg()[0]:.2f}')
    print(f'image + occluded per batch: {pixels / 2**20:.1f} MiB as uint8 '
          f'({4 * pixels / 2**20:.1f} MiB as float32)')
    print(f'{"workers":>8} {"path":>7} {"images/s":>10} {"ms/batch":>10}')
    for workers in (int(w) for w in _WORKERS.value):
      config.input.num_workers = workers
      for device in (False, True) if _DEVICE.value else (False,):
        ips = time_pipeline(split, config, _BATCHES.value, _WARMUP.value, device)
        print(f'{workers:>8} {"device" if device else "host":>7} {ips:>10.1f} '
              f'{1000 * batch / ips:>10.1f}', flush=True)


if __name__ == '__main__':
  app.run(main)
