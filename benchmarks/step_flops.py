"""FLOPs of one OGFR train step (teacher + FEPM agent + student + update) from XLA, compile only.

  python benchmarks/step_flops.py                     # ViT-B/16, stride 12, 256x128, batch 64
  python benchmarks/step_flops.py --size large --batch 64 --json
  python benchmarks/step_flops.py --devices 8 --mesh 1x8 --batch 64   # per-device, FSDP

The step is the one training runs (`train_step.jit_train_step` over `parallel.make_mesh`), built
with `benchmarks/train_step_cost.py`'s config and batch, lowered on abstract inputs
(ShapeDtypeStructs carrying their shardings) and compiled; `compiled.cost_analysis()` gives
the FLOPs. Nothing is executed and no parameters are allocated, so a CPU host is enough. On
the CPU backend every matmul stays an HLO dot that the cost analysis counts (GPU compilers turn
them into library calls it may not see); --dtype bfloat16 adds a few percent of casts (tiny
model: +3.9%).

With --devices N (fake CPU devices) and --mesh DATAxFSDP it also compiles the partitioned
program and reports the FLOPs of one device's share and the collectives XLA inserted, which
shows whether FSDP keeps the compute split by the batch (per-device FLOPs ~ total / N).

Measured (jax 0.10.2, XLA CPU backend, float32; 2 shared CPU cores, compile ~45 s each):
  python benchmarks/step_flops.py
    base (211 tokens) batch 64 on 1 device: 15.19 TFLOP/step, 237.4 GFLOP/image
    (6.33 ViT-B forwards by the formula's 37.5 GFLOP), 172.8 M parameters
  python benchmarks/step_flops.py --devices 8 --mesh 1x8
    15.22 TFLOP/step over 8 devices (1.90 TFLOP each: the compute stays split by the batch),
    per device all-gather x132 (1254 MiB), all-reduce x89 (681 MiB); state 167 of 1319 MiB
The scaling plan in launch/README.md uses these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all',
                'collective-permute')
_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1,
                'u8': 1, 'f64': 8, 's64': 8, 'u64': 8}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--size', default='base', help='a key of config_defaults.VIT_SIZES')
  p.add_argument('--patch', type=int, default=16)
  p.add_argument('--stride', type=int, default=12)
  p.add_argument('--height', type=int, default=256)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--batch', type=int, default=64, help='global batch (P x K, K = 4)')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--num-classes', type=int, default=702)
  p.add_argument('--devices', type=int, default=1, help='fake CPU devices (before jax starts)')
  p.add_argument('--mesh', default='-1x1', help='DATAxFSDP over the devices')
  p.add_argument('--jpm', action='store_true', help='with the JPM part branch (model.jpm)')
  p.add_argument('--json', action='store_true')
  return p.parse_args(argv)


def analytic_forward_flops(dim: int, depth: int, tokens: int) -> float:
  """2 x multiply-adds of one ViT forward per image: 24 d^2 + 4 n d per token per layer."""
  return float(depth * tokens * (24 * dim * dim + 4 * tokens * dim))


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """Count and result bytes of each collective in an optimized HLO module's text."""
  out = {name: {'count': 0, 'bytes': 0} for name in _COLLECTIVES}
  pattern = re.compile(r'=\s+(\(?[^=]*?\)?)\s+(' + '|'.join(_COLLECTIVES) + r')(-start)?\(')
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    nbytes = 0
    for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', m.group(1)):
      n = 1
      for d in filter(None, dims.split(',')):
        n *= int(d)
      nbytes += n * _DTYPE_BYTES.get(dtype, 4)
    out[m.group(2)]['count'] += 1
    out[m.group(2)]['bytes'] += nbytes
  return {k: v for k, v in out.items() if v['count']}


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def step_flops(args: argparse.Namespace) -> dict:
  """Compiles the train step for args and returns its FLOPs and layout facts."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, _ROOT)
  from benchmarks import train_step_cost  # pylint: disable=g-import-not-at-top
  from ogfr_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from ogfr_jax import optim  # pylint: disable=g-import-not-at-top
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_state  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_step  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top

  config = train_step_cost.bench_config(args)
  config.model.jpm = args.jpm
  config.mesh.data, config.mesh.fsdp = (int(v) for v in args.mesh.split('x'))
  mesh = parallel.make_mesh(config.mesh)
  parallel.batch_size_per_device_check(args.batch, mesh, '--batch')
  model = build.build_model(config, args.num_classes, 6)
  tx, lr_fn = optim.make_optimizer(config, args.batch, 100, 10_000)
  abstract = jax.eval_shape(functools.partial(train_state.init_state, model, tx, config),
                            jax.random.PRNGKey(0))
  shardings = parallel.state_shardings(abstract, mesh)
  state = checkpoints.abstract_with_shardings(abstract, shardings)
  host = train_step_cost.random_batch(config, args.batch, args.num_classes,
                                      np.random.default_rng(0))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh))
           for k, v in host.items()}
  step_fn = train_step.jit_train_step(model, tx, config, lr_fn, mesh, shardings)
  t = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t

  dim, depth, _ = config_defaults.VIT_SIZES[args.size]
  tokens = ((args.height - args.patch) // args.stride + 1) * (
      (args.width - args.patch) // args.stride + 1) + 1
  flops = _flops(compiled)  # one device's program
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract.params))
  result = {
      'size': args.size, 'tokens': tokens, 'batch': args.batch, 'dtype': args.dtype,
      'devices': mesh.size, 'mesh': dict(mesh.shape), 'params': n_params,
      'compile_s': round(compile_s, 1),
      'flops_per_device_step': flops,
      'flops_per_step': flops * mesh.size,
      'flops_per_image': flops * mesh.size / args.batch,
      'analytic_vit_forward_flops_per_image': analytic_forward_flops(dim, depth, tokens),
  }
  if mesh.size > 1:
    result['collectives'] = collective_bytes(compiled.as_text())
    summary = parallel.sharding_summary(abstract, shardings)
    result['state_bytes_per_device'] = summary['per_device_bytes']
    result['state_bytes_total'] = summary['total_bytes']
  return result


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.devices > 1:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  r = step_flops(args)
  fwd = r['analytic_vit_forward_flops_per_image']
  print(f"{r['size']} ({r['tokens']} tokens) batch {r['batch']} on {r['devices']} device(s) "
        f"{r['mesh']}: {r['flops_per_step'] / 1e12:.2f} TFLOP/step, "
        f"{r['flops_per_image'] / 1e9:.1f} GFLOP/image (XLA; one ViT forward by formula: "
        f"{fwd / 1e9:.1f} GFLOP, ratio {r['flops_per_image'] / fwd:.2f}), "
        f"{r['params'] / 1e6:.1f} M parameters, compile {r['compile_s']:.0f} s")
  if 'collectives' in r:
    print('per device: ' + ', '.join(
        f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in r['collectives'].items())
          + f"; state {r['state_bytes_per_device'] / 2**20:.0f} of "
          f"{r['state_bytes_total'] / 2**20:.0f} MiB")
  if args.json:
    print(json.dumps(r))
  return r


if __name__ == '__main__':
  main()
