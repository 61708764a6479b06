"""One process of a multi-process workdir set-up (tests/test_scaling.py).

  python tests/workdir_child.py --workdir WD --seed S [--overwrite] [--slow_delete SECONDS]
      --out OUT_PREFIX --coordinator_address 127.0.0.1:PORT --num_processes N --process_id I

Joins the other processes, runs `run_config.prepare_workdir` as the entry point does, and
writes OUT_PREFIX.<process>.json with what this process finds in the workdir the moment
prepare_workdir returns: the checkpoint folders and the seed in config.json.
--slow_delete makes process 0's deletion of the checkpoints take that long, as on a slow
object store, so that a process that does not wait for it sees them still there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True)
  p.add_argument('--seed', type=int, required=True)
  p.add_argument('--overwrite', action='store_true')
  p.add_argument('--slow_delete', type=float, default=0.0)
  p.add_argument('--out', required=True)
  p.add_argument('--coordinator_address', required=True)
  p.add_argument('--num_processes', type=int, required=True)
  p.add_argument('--process_id', type=int, required=True)
  args = p.parse_args(argv)
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, _ROOT)
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                  args.process_id, timeout_s=120)
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from ogfr_jax import paths  # pylint: disable=g-import-not-at-top
  from ogfr_jax import run_config  # pylint: disable=g-import-not-at-top
  if args.slow_delete and args.process_id == 0:
    rmtree = paths.rmtree

    def slow_rmtree(path):
      time.sleep(args.slow_delete)
      rmtree(path)

    paths.rmtree = slow_rmtree
  config = config_defaults.base_config()
  config.seed = args.seed
  run_config.prepare_workdir(args.workdir, config, overwrite=args.overwrite)
  folder = os.path.join(args.workdir, 'checkpoints')
  with open(os.path.join(args.workdir, 'config.json')) as f:
    seen = {'checkpoints': sorted(os.listdir(folder)) if os.path.isdir(folder) else None,
            'seed': json.load(f)['seed']}
  with open(f'{args.out}.{args.process_id}.json', 'w') as f:
    json.dump(seen, f)


if __name__ == '__main__':
  main()
