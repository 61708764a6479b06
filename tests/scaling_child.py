"""One run of the scaling tests, in a process of its own; also the config file of those runs.

The number of JAX devices is fixed when a process starts, so every device count / process
count / mesh of tests/test_scaling.py runs in a fresh subprocess:

  python tests/scaling_child.py --out OUT.npz --workdir WD --cache CACHE --devices 8 \
      --mesh 2x4 [--fsdp_min_size 64] [--steps 4] [--skip_training] \
      [--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I]

Unless --skip_training, it trains with `train.train_and_evaluate` (the real loop: multi-process
logging, orbax checkpoints, resume from WD/checkpoints, final evaluation). Then it restores the
last two checkpoints of WD into this process layout and writes, from process 0 only, an npz
with the logged per-step losses, the parameters and BatchNorm statistics, the query features,
the ranking metrics and facts about the run (devices, processes, mesh, arrays split by FSDP).

As a config file (`get_config`), it gives the entry point the same run:
  python -m ogfr_jax.main --config tests/scaling_child.py:cache=CACHE,steps=4,mesh=1x8 ...
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', required=True)
  p.add_argument('--workdir', required=True)
  p.add_argument('--cache', required=True, help='synthetic dataset cache folder')
  p.add_argument('--devices', type=int, default=0,
                 help='fake CPU devices of this process (0: as XLA_FLAGS says)')
  p.add_argument('--mesh', default='-1x1', help='DATAxFSDP')
  p.add_argument('--fsdp_min_size', type=int, default=0, help='0: the library default')
  p.add_argument('--steps', type=int, default=4)
  p.add_argument('--skip_training', action='store_true', help='only restore and report')
  p.add_argument('--coordinator_address', default=None)
  p.add_argument('--num_processes', type=int, default=None)
  p.add_argument('--process_id', type=int, default=None)
  return p.parse_args(argv)


def scaling_config(cache: str, steps: int = 4, mesh: str = '-1x1'):
  """The synthetic preset of helpers.make_config with settings that make runs comparable to
  float rounding.

  Plain SGD and no stochastic depth; the data augmentation, the occlusions and the agent's
  samples stay random, drawn identically on every layout. An MLP ratio of 16 makes the
  64 x 1024 MLP kernels reach parallel.FSDP_MIN_SIZE, so FSDP splits them even with the
  library's default threshold.
  """
  tests = os.path.join(_ROOT, 'tests')  # also when ogfr_jax.main reads this file as a config
  if tests not in sys.path:
    sys.path.insert(0, tests)
  from helpers import make_config  # pylint: disable=g-import-not-at-top
  data, fsdp = (int(v) for v in mesh.split('x'))
  return make_config({
      'model.mlp_ratio': 16.0,
      'model.drop_path': 0.0,
      'input.num_workers': 0,
      'optim.name': 'sgd',
      'optim.lr': 0.4,  # large enough that parameters move far beyond the tolerances
      'optim.warmup_epochs': 0,
      'train.steps_per_epoch': int(steps),
      'train.checkpoint_every': 2,
      'train.keep_checkpoints': 4,
      'mesh.data': data, 'mesh.fsdp': fsdp,
  }, preset='synthetic', cache=cache)


def get_config(arg=None):
  """`--config tests/scaling_child.py:cache=DIR,steps=N,mesh=DxF` for ogfr_jax.main."""
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  arg = config_defaults.parse_arg(arg, cache='', steps=4, mesh='-1x1')
  if not arg.cache:
    raise ValueError('tests/scaling_child.py needs cache=DIR (the synthetic dataset cache)')
  return scaling_config(arg.cache, arg.steps, arg.mesh)


def flatten(tree, prefix: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[prefix + '/'.join(str(getattr(k, 'key', k)) for k in path)] = leaf
  return out


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.devices:
    # Before jax is imported: the device count is read once, at backend creation.
    os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, _ROOT)
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(sys.argv[:1])  # grain reads absl flags

  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                  args.process_id, timeout_s=120)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if args.fsdp_min_size:
    parallel.FSDP_MIN_SIZE = args.fsdp_min_size
  from ogfr_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from ogfr_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ogfr_jax import optim  # pylint: disable=g-import-not-at-top
  from ogfr_jax import run_config  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_state  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import loading  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top

  config = scaling_config(args.cache, args.steps, args.mesh)
  run_config.validate(config)
  if not args.skip_training:
    train.train_and_evaluate(config, args.workdir)

  # The state as a later run sees it: the last two checkpoints restored into this layout's
  # shardings (shapes from eval_shape as in train.setup, without compiling another init).
  train_data, test_data = loading.load_data(config)
  mesh = parallel.make_mesh(config.mesh)
  steps_per_epoch, total_steps = loading.schedule_lengths(config, train_data.train)
  model = build.build_model(config, train_data.num_train_ids,
                            max(train_data.num_cameras, test_data.num_cameras))
  tx, _ = optim.make_optimizer(config, config.input.ids_per_batch * config.input.images_per_id,
                               steps_per_epoch, total_steps)
  abstract = jax.eval_shape(functools.partial(train_state.init_state, model, tx, config),
                            jax.random.PRNGKey(config.seed))
  shardings = parallel.state_shardings(abstract, mesh)
  target = checkpoints.abstract_with_shardings(abstract, shardings)
  manager = checkpoints.make_manager(args.workdir, max_to_keep=config.train.keep_checkpoints)
  step = int(manager.latest_step())
  state, _ = checkpoints.restore(manager, step, target)
  earlier, _ = checkpoints.restore(manager, step - 2, target)
  restored_split = sum(not leaf.sharding.is_fully_replicated
                       for leaf in jax.tree_util.tree_leaves(state.params))
  summary = parallel.sharding_summary(abstract.params, shardings.params)
  params = parallel.fetch(state.params)
  earlier_params = parallel.fetch(earlier.params)
  batch_stats = parallel.fetch(state.batch_stats)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  extract_fn = evaluate.make_extract_fn(model, config, mesh)
  query = evaluate.extract_split(extract_fn, variables, test_data.query, config, mesh)
  manager.close()
  if jax.process_index() != 0:
    return

  lines = [json.loads(l) for l in open(os.path.join(args.workdir, 'metrics.jsonl'))]
  lines = [l for l in lines if 'train/loss/total' in l]
  with open(os.path.join(args.workdir, 'results.json')) as f:
    metrics = json.load(f)[test_data.name]
  out = {
      'loss_steps': np.array([l['step'] for l in lines], np.int32),
      'losses': np.array([l['train/loss/total'] for l in lines], np.float64),
      'query_features': query,
      'restored_step': np.int32(step),
      'process_count': np.int32(jax.process_count()),
      'device_count': np.int32(jax.device_count()),
      'mesh_shape': np.array([mesh.shape['data'], mesh.shape['fsdp']], np.int32),
      'num_split': np.int32(summary['num_split']),
      'restored_split': np.int32(restored_split),
      'per_device_bytes': np.int64(summary['per_device_bytes']),
      'total_bytes': np.int64(summary['total_bytes']),
      # How far the last two steps moved the parameters: agreement within a tolerance far
      # below this says something about the layouts.
      'last_steps_change': np.float64(max(
          float(np.max(np.abs(a - b))) for a, b in zip(
              jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(earlier_params)))),
  }
  for key in ('rank1', 'rank5', 'mAP', 'mINP', 'step'):
    out[f'metric/{key}'] = np.float64(metrics[key])
  out.update(flatten(params, 'params/'))
  out.update(flatten(batch_stats, 'batch_stats/'))
  tmp = args.out + '.tmp.npz'
  np.savez(tmp, **out)
  os.replace(tmp, args.out)


if __name__ == '__main__':
  main()
