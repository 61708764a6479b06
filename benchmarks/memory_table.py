r"""Memory per device of each real recipe's compiled train step, by compute dtype and remat.

  python benchmarks/memory_table.py [--configs occluded_duke,market1501] [--dtypes float32]
      [--remat none,block] [--batch 64] [--json out.json]

For every config in configs/ that trains on real data, at its own global batch, the train step
is lowered from shapes only (nothing is initialised) and compiled for this machine's backend;
XLA's memory analysis (`compiled.memory_analysis()`) gives the bytes per device of its
temporaries, arguments (train state + batch), outputs, and the outputs aliased to donated
arguments (the new state reuses the old state's buffers). Attention is XLA's: cuDNN's fused
attention compiles only on an NVIDIA GPU.

On a CPU the figures are an upper bound for accelerators, not a prediction: XLA:CPU's buffer
assignment has no memory-pressure-aware scheduler, and it places the recomputation of
model.remat next to the forward computation, so remat changes little here while on a GPU or
TPU it removes most of the stored activations. Run it on the accelerator for its own figures.
The classifier sizes use each dataset's published number of training identities and cameras.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from ogfr_jax import bench  # noqa: E402
from ogfr_jax import parallel  # noqa: E402
from ogfr_jax import precision  # noqa: E402

# config -> (training identities, cameras) of the training set it reads.
REAL_CONFIGS = {
    'occluded_duke': (702, 8),
    'market1501': (751, 6),
    'dukemtmc': (702, 8),
    'msmt17': (1041, 15),
    'occluded_reid': (751, 6),
    'partial_reid': (751, 6),
    'partial_ilids': (751, 6),
}
DTYPES = ('float32', 'bfloat16')
REMATS = ('none', 'dots', 'block')


def _list(value: str, allowed, flag: str) -> list[str]:
  items = [v.strip() for v in value.split(',') if v.strip()]
  bad = [v for v in items if v not in allowed]
  if bad or not items:
    raise SystemExit(f'error: {flag}={value!r}: use a comma-separated subset of '
                     f'{",".join(allowed)}')
  return items


def gib(n: int) -> str:
  return f'{n / 2**30:.2f}'


def measure(name: str, dtype: str, remat: str, batch: int | None) -> dict:
  config = bench.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
  config.model.dtype, config.model.remat, config.model.attention_impl = dtype, remat, 'xla'
  if batch is not None:
    config.input.ids_per_batch = batch // config.input.images_per_id
  config = precision.resolve(config)
  classes, cameras = REAL_CONFIGS[name]
  mesh = parallel.make_mesh(config.mesh)
  memory = bench.step_memory(config, classes, cameras, mesh)
  gh, gw = bench.build.token_grid(config)
  return {'config': name, 'dtype': dtype, 'remat': remat, 'size': config.model.size,
          'batch': bench.train_batch_size(config), 'tokens': 1 + gh * gw,
          'devices': mesh.size, 'platform': jax.default_backend(), **memory}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--configs', default=','.join(REAL_CONFIGS))
  p.add_argument('--dtypes', default=','.join(DTYPES))
  p.add_argument('--remat', default=','.join(REMATS))
  p.add_argument('--batch', type=int, default=None, help='global batch (default: the config\'s)')
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  names = _list(args.configs, REAL_CONFIGS, '--configs')
  dtypes = _list(args.dtypes, DTYPES, '--dtypes')
  remats = _list(args.remat, REMATS, '--remat')
  # Configs that train the same step (the cross-domain protocols train on Market-1501 like
  # market1501.py) are compiled once and listed together.
  groups: dict[str, list[str]] = {}
  for name in names:
    config = bench.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
    config.dataset.test_name = ''
    groups.setdefault(config.to_json(sort_keys=True), []).append(name)
  rows = []
  print(f'train step memory per device (GiB), XLA memory analysis on {jax.default_backend()} '
        f'({len(jax.devices())} device(s)); an upper bound for accelerators')
  print('| config | batch | tokens | dtype | remat | temp | arguments | outputs | aliased |')
  print('|---|---|---|---|---|---|---|---|---|')
  for same in groups.values():
    name, label = same[0], ' = '.join(same)
    for dtype in dtypes:
      for remat in remats:
        r = measure(name, dtype, remat, args.batch)
        rows += [{**r, 'config': n} for n in same]
        print(f"| {label} | {r['batch']} | {r['tokens']} | {dtype} | {remat} | {gib(r['temp'])} "
              f"| {gib(r['argument'])} | {gib(r['output'])} | {gib(r['alias'])} |", flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
