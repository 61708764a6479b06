"""Time and memory of one OGFR train step (teacher + FEPM agent + student), on random data.

  python benchmarks/train_step_cost.py --size base --stride 12 --batch 8
  python benchmarks/train_step_cost.py --size tiny --height 128 --width 64 --batch 32 --json

Reports compile time, the median and spread of the step time over --repeats timed steps
(after --warmup untimed ones), images/s, XLA's FLOP estimate of the compiled step, and the
process's peak resident memory (ru_maxrss; on a GPU also the device's peak bytes in use).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import numpy as np

from ogfr_jax import config_defaults
from ogfr_jax import optim
from ogfr_jax import parallel
from ogfr_jax import train_state
from ogfr_jax import train_step
from ogfr_jax.data import donor_exchange
from ogfr_jax.models import build


def bench_config(args):
  c = config_defaults.base_config()
  c.model.size = args.size
  c.model.patch_size, c.model.stride = args.patch, args.stride
  c.model.dtype = args.dtype
  c.model.drop_path = 0.1
  c.input.height, c.input.width = args.height, args.width
  c.input.images_per_id = 4
  c.input.ids_per_batch = args.batch // 4
  c.mesh.data = -1
  return c


def random_batch(config, batch: int, num_classes: int, rng: np.random.Generator):
  h, w = config.input.height, config.input.width
  k = len(config.occlusion.patterns)
  pids = np.repeat(np.arange(batch // 4), 4).astype(np.int32)
  out = {
      'image': rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8),
      'occluded': rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8),
      'pattern': rng.integers(0, k + 1, batch).astype(np.int32),
      'pid': (pids % num_classes).astype(np.int32),
      'camid': rng.integers(0, 6, batch).astype(np.int32),
  }
  if 'index' in build.batch_keys(config):  # the consistency memory's rows
    out['index'] = np.arange(batch, dtype=np.int32)
  if donor_exchange.on_device(config):
    # The paste's gather and select run whatever the donors, so none costs the same.
    out.update(donor_exchange.no_donors(np.arange(batch)))
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--size', default='base', choices=sorted(config_defaults.VIT_SIZES))
  p.add_argument('--patch', type=int, default=16)
  p.add_argument('--stride', type=int, default=12)
  p.add_argument('--height', type=int, default=256)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--num-classes', type=int, default=702)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--json', action='store_true')
  args = p.parse_args(argv)

  config = bench_config(args)
  mesh = parallel.make_mesh(config.mesh)
  model = build.build_model(config, args.num_classes, 6)
  tx, lr_fn = optim.make_optimizer(config, args.batch, 100, 10_000)
  state, _, shardings = train_state.create_sharded_state(model, tx, config, mesh,
                                                   jax.random.PRNGKey(0))
  step_fn = train_step.jit_train_step(model, tx, config, lr_fn, mesh, shardings)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(random_batch(config, args.batch, args.num_classes, rng), mesh)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) if cost else float('nan')

  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  loss = float(metrics['loss/total'])

  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  tokens = ((args.height - args.patch) // args.stride + 1) * (
      (args.width - args.patch) // args.stride + 1) + 1
  result = {
      'device': dev.device_kind, 'num_devices': jax.device_count(), 'size': args.size,
      'tokens': tokens, 'batch': args.batch, 'dtype': args.dtype,
      'compile_s': round(compile_s, 2),
      'step_s_median': float(np.median(times)), 'step_s_min': float(np.min(times)),
      'step_s_max': float(np.max(times)), 'repeats': args.repeats,
      'images_per_s': args.batch / float(np.median(times)),
      'xla_flops_per_step': flops,
      'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      'device_peak_gib': stats.get('peak_bytes_in_use', 0) / 2**30,
      'loss': loss,
  }
  if not np.isfinite(loss):
    sys.exit(f'non-finite loss in the benchmark step: {result}')
  print(f"{args.size} ({tokens} tokens) batch {args.batch} {args.dtype} on "
        f"{result['num_devices']}x {result['device']}: compile {result['compile_s']:.1f} s, "
        f"step {result['step_s_median']:.3f} s median "
        f"[{result['step_s_min']:.3f}, {result['step_s_max']:.3f}] over {args.repeats}, "
        f"{result['images_per_s']:.1f} img/s, {flops / 1e9:.1f} GFLOP/step (XLA), "
        f"peak RSS {result['peak_rss_gib']:.2f} GiB")
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
