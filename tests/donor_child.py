"""One process of the two-process donor exchange test (tests/test_donor_exchange.py).

  python tests/donor_child.py --split DIR --out OUT_PREFIX [--steps N] \
      --coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I

Each process builds its own rows of the train batches in both modes of
config.input.donor_exchange, puts them on a process-major mesh and on one that interleaves
the two processes' devices (as a TPU torus may), pastes the donor boxes on the devices and
gathers the results. It writes OUT_PREFIX.<process>.npz with, per mesh and step, the
device-pasted occluded batch, the host-rendered one and the other keys, all in the global
array's row order, which the test compares with a single-process build of the same batches.
"""

from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('image', 'occluded', 'pattern', 'occ_mask', 'pid', 'index')
# Overrides of the 'loader' preset of helpers.make_config; input.donor_exchange is the mode.
CONFIG = {'seed': 11, 'input.prefetch': 0, 'occlusion.prob': 1.0,
          'occlusion.patterns': ('object', 'person', 'crop')}


def read_split(folder: str):
  """The split of `folder`'s `PPPP_cC_fFFFFFFF.jpg` files in the order the test wrote them
  (by pid, then frame; pids 0-based)."""
  from ogfr_jax.data import records  # pylint: disable=g-import-not-at-top
  names = sorted((n for n in os.listdir(folder) if n.endswith('.jpg')),
                 key=lambda n: (n[:4], n.split('_f')[1]))
  return records.Split.from_lists([os.path.join(folder, n) for n in names],
                                  [int(n[:4]) - 1 for n in names],
                                  [int(n.split('_c')[1][0]) - 1 for n in names])


def meshes():
  """Process-major, and with the processes' devices alternating along the batch axes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  from helpers import make_config  # pylint: disable=g-import-not-at-top
  major = parallel.make_mesh(
      make_config({**CONFIG, 'input.donor_exchange': 'host'}, preset='loader').mesh)
  by_process = [[d for d in jax.devices() if d.process_index == p]
                for p in range(jax.process_count())]
  alternating = [d for group in zip(*by_process) for d in group]
  interleaved = jax.sharding.Mesh(np.asarray(alternating, dtype=object).reshape(-1, 1),
                                  parallel.MESH_AXES)
  return {'major': major, 'interleaved': interleaved}


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--split', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--coordinator_address', required=True)
  p.add_argument('--num_processes', type=int, required=True)
  p.add_argument('--process_id', type=int, required=True)
  args = p.parse_args(argv)
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, _ROOT)
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(sys.argv[:1])  # grain reads absl flags
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                  args.process_id, timeout_s=120)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import donor_exchange  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from helpers import make_config  # pylint: disable=g-import-not-at-top

  split = read_split(args.split)
  where = {'process_index': jax.process_index(), 'process_count': jax.process_count()}
  iters = {mode: pipeline.make_train_iterator(
               split, make_config({**CONFIG, 'input.donor_exchange': mode}, preset='loader'),
               **where)
           for mode in ('host', 'device')}
  batches = {mode: [next(it) for _ in range(args.steps)] for mode, it in iters.items()}
  for it in iters.values():
    it.close()
  paste = jax.jit(donor_exchange.fill_donors)
  out = {}
  for name, mesh in meshes().items():
    out[f'{name}/pipeline_order'] = np.bool_(parallel.pipeline_order(mesh))
    for step in range(args.steps):
      host = parallel.global_batch({k: batches['host'][step][k] for k in KEYS}, mesh)
      device = parallel.global_batch(
          {k: batches['device'][step][k] for k in KEYS + donor_exchange.KEYS}, mesh)
      pasted = paste(device)
      fetched = parallel.fetch({'host': host, 'pasted': pasted, 'row': device['row'],
                                'unpasted': device['occluded']})
      prefix = f'{name}/{step}/'
      out[prefix + 'pasted'] = fetched['pasted']['occluded']
      out[prefix + 'unpasted'] = fetched['unpasted']
      out[prefix + 'row'] = fetched['row']
      for k in KEYS:
        out[prefix + 'host_' + k] = fetched['host'][k]
  np.savez(f'{args.out}.{jax.process_index()}.npz', **out)


if __name__ == '__main__':
  main()
