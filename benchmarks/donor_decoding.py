"""Images each host decodes per train step, per row it owns, for both donor exchanges.

The 'person' and 'crop' occluders take a box from another row of the global batch. Under
config.input.donor_exchange='host' a process decodes and augments again every donor row that
another process owns; under 'device' the train step pastes the boxes from the global image
batch and a process decodes only its own rows. This script builds the per-process batches of
the config's recipe (P x K, occlusion types and probability; Occluded-Duke by default) for
each simulated process count, every process of it in turn (`make_train_iterator` with
process_index / process_count, no multi-process JAX), on a generated folder of small JPEGs,
and counts the image decodes.

  python benchmarks/donor_decoding.py                    # 1, 8, 64 processes, 20 steps
  python benchmarks/donor_decoding.py --processes 1,2,16 --steps 50 --config configs/market1501.py

Prints one line per (processes, mode): decoded rows per host per step (mean and the busiest
host), rows owned, and the extra share. --json also writes the figures as JSON.

`python benchmarks/donor_decoding.py --steps 100` (Occluded-Duke: 16 x 4, prob 0.75,
object/texture/person/crop):

  processes rows/host   mode decoded/host    max   extra
          1        64   host        64.00  64.00    0.0%
          1        64 device        64.00  64.00    0.0%
          8         8   host        10.82  10.90   35.2%
          8         8 device         8.00   8.00    0.0%
         64         1   host         1.38   1.50   38.2%
         64         1 device         1.00   1.00    0.0%
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from ogfr_jax.data import image_io  # pylint: disable=wrong-import-position
from ogfr_jax.data import pipeline  # pylint: disable=wrong-import-position
from ogfr_jax.data import records  # pylint: disable=wrong-import-position


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('recipe', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_split(folder: str, ids: int, per_id: int) -> records.Split:
  """Tiny JPEGs (the pipeline resizes them to the recipe's size; decoding counts are what
  matter here, not pixels)."""
  rng = np.random.default_rng(0)
  paths, pids, camids = [], [], []
  for pid in range(ids):
    for k in range(per_id):
      path = os.path.join(folder, f'{pid + 1:04d}_c{k % 6 + 1}_f{k:07d}.jpg')
      Image.fromarray(rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)).save(path)
      paths.append(path)
      pids.append(pid)
      camids.append(k % 6)
  return records.Split.from_lists(paths, pids, camids)


class DecodeCounter:
  """Counts the train pipeline's image decodes (wraps image_io.load_image as it sees it)."""

  def __init__(self):
    self.count = 0
    self._load = image_io.load_image

  def __call__(self, *args, **kwargs):
    self.count += 1
    return self._load(*args, **kwargs)


def decoded_per_host(split, config, processes: int, steps: int,
                     counter: DecodeCounter) -> list[float]:
  """Decodes per step of each of `processes` simulated processes."""
  out = []
  for p in range(processes):
    it = pipeline.make_train_iterator(split, config, process_index=p, process_count=processes)
    counter.count = 0
    for _ in range(steps):
      next(it)
    it.close()
    out.append(counter.count / steps)
  return out


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=os.path.join(_ROOT, 'configs', 'occluded_duke.py'))
  parser.add_argument('--processes', default='1,8,64', help='comma-separated process counts')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--ids', type=int, default=64, help='identities in the generated folder')
  parser.add_argument('--per_id', type=int, default=6)
  parser.add_argument('--size', default='64x32',
                      help='HxW the pipeline builds (counts do not depend on it)')
  parser.add_argument('--json', default='', help='also write the figures to this file')
  args = parser.parse_args(argv)

  config = load_config(args.config)
  config.input.num_workers, config.input.prefetch = 0, 0
  config.input.height, config.input.width = (int(v) for v in args.size.split('x'))
  batch = config.input.ids_per_batch * config.input.images_per_id
  counter = DecodeCounter()
  pipeline.image_io.load_image = counter
  rows = []
  print(f'recipe {os.path.basename(args.config)}: global batch {config.input.ids_per_batch} x '
        f'{config.input.images_per_id} = {batch}, occlusion prob {config.occlusion.prob}, '
        f'types {tuple(config.occlusion.patterns)}, {args.steps} steps')
  print(f'{"processes":>9} {"rows/host":>9} {"mode":>6} {"decoded/host":>12} '
        f'{"max":>6} {"extra":>7}')
  with tempfile.TemporaryDirectory() as folder:
    split = write_split(folder, args.ids, args.per_id)
    for processes in (int(v) for v in args.processes.split(',')):
      owned = batch // processes
      for mode in ('host', 'device'):
        config.input.donor_exchange = mode
        per_host = decoded_per_host(split, config, processes, args.steps, counter)
        mean = float(np.mean(per_host))
        row = {'processes': processes, 'rows_per_host': owned, 'mode': mode,
               'decoded_per_host': mean, 'max_decoded_per_host': float(max(per_host)),
               'extra': mean / owned - 1.0}
        rows.append(row)
        print(f'{processes:>9} {owned:>9} {mode:>6} {mean:>12.2f} {max(per_host):>6.2f} '
              f'{100 * row["extra"]:>6.1f}%')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == '__main__':
  main()
