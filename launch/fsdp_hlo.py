r"""Does the compiled train step all-reduce whole weight gradients under FSDP?

  python launch/fsdp_hlo.py --mesh 1x8 --out step_hlo.txt                 # this host's devices
  python launch/fsdp_hlo.py --devices 8 --mesh 1x8 --size tiny --out hlo.txt   # fake CPUs

Compiles `train_step.jit_train_step` (the step training runs) on abstract inputs over the
('data', 'fsdp') mesh, writes the optimized HLO of one device's program to --out, and lists
every all-reduce whose result has the full shape of a parameter that FSDP splits: that is a
weight gradient summed whole on every device and sliced afterwards, where FSDP wants a
reduce-scatter (each device receives only its slice of the summed gradient). Exit status 1
when there is one, 0 otherwise; --json prints the report.

What the backends do (jax 0.10.2): XLA:CPU runs no reduce-scatter creation pass, so on fake
CPU devices the gradients of split weights are full-size all-reduces followed by a dynamic
slice (the check fails there by design: `--expect-full-all-reduce` turns it into the test of
the detector). GPU and TPU compilers rewrite all-reduce + dynamic-slice into reduce-scatter;
run this on the accelerator (`--mesh 1xN` over its devices) to check a recipe.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHAPE = re.compile(r'(\w+)\[([\d,]*)\]')
# `%name = f32[64,1024]{1,0} all-reduce(...)` or the async `all-reduce-start`; a tuple result
# `(f32[..], f32[..]) all-reduce(...)` lists each operand.
_OP = re.compile(r'=\s+(\(.*?\)|\S+)\s+(all-reduce|reduce-scatter|all-gather)(-start)?\(')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--devices', type=int, default=0,
                 help='fake CPU devices (0: the devices of this host as they are)')
  p.add_argument('--mesh', default='1x-1', help='DATAxFSDP')
  p.add_argument('--size', default='tiny', help='a key of config_defaults.VIT_SIZES')
  p.add_argument('--height', type=int, default=64)
  p.add_argument('--width', type=int, default=32)
  p.add_argument('--batch', type=int, default=16, help='global batch (P x K, K = 4)')
  p.add_argument('--mlp-ratio', type=float, default=16.0,
                 help='16 makes the tiny ViT 64 x 1024 MLP kernels big enough to split')
  p.add_argument('--fsdp-min-size', type=int, default=0,
                 help='split arrays from this many elements (0: parallel.FSDP_MIN_SIZE)')
  p.add_argument('--out', default='', help='file for the optimized HLO text')
  p.add_argument('--json', action='store_true')
  p.add_argument('--expect-full-all-reduce', action='store_true',
                 help='exit 0 only when such all-reduces are found (XLA:CPU)')
  return p.parse_args(argv)


def collectives(hlo_text: str) -> list[tuple[str, list[tuple[int, ...]]]]:
  """(op, result shapes) of every all-reduce / reduce-scatter / all-gather in HLO text."""
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m:
      shapes = [tuple(int(d) for d in dims.split(',') if d)
                for _, dims in _SHAPE.findall(m.group(1))]
      out.append((m.group(2), shapes))
  return out


def full_weight_all_reduces(hlo_text: str, split_shapes: dict[str, tuple[int, ...]]
                            ) -> dict[str, int]:
  """{parameter name: number of all-reduces with its full shape} for split parameters.

  Shapes identify the parameters; a shape shared by a parameter and an activation could
  over-count, which errs on the side of failing the check.
  """
  counts: dict[tuple[int, ...], int] = {}
  for op, shapes in collectives(hlo_text):
    if op == 'all-reduce':
      for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
  return {name: counts[shape] for name, shape in split_shapes.items() if shape in counts}


def compile_step(args: argparse.Namespace):
  """(optimized HLO text, {split parameter: full shape}, mesh shape) of the train step."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, _ROOT)
  from benchmarks import train_step_cost  # pylint: disable=g-import-not-at-top
  from ogfr_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from ogfr_jax import optim  # pylint: disable=g-import-not-at-top
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_state  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_step  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  if args.fsdp_min_size:
    parallel.FSDP_MIN_SIZE = args.fsdp_min_size
  config = train_step_cost.bench_config(argparse.Namespace(
      size=args.size, patch=16, stride=16, dtype='float32', height=args.height,
      width=args.width, batch=args.batch))
  config.model.drop_path = 0.0
  config.model.mlp_ratio = args.mlp_ratio
  config.mesh.data, config.mesh.fsdp = (int(v) for v in args.mesh.split('x'))
  mesh = parallel.make_mesh(config.mesh)
  num_classes = 16
  model = build.build_model(config, num_classes, 6)
  tx, lr_fn = optim.make_optimizer(config, args.batch, 100, 10_000)
  abstract = jax.eval_shape(functools.partial(train_state.init_state, model, tx, config),
                            jax.random.PRNGKey(0))
  shardings = parallel.state_shardings(abstract, mesh)
  state = checkpoints.abstract_with_shardings(abstract, shardings)
  host = train_step_cost.random_batch(config, args.batch, num_classes,
                                      np.random.default_rng(0))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh))
           for k, v in host.items() if k in train_step.step_keys(config)}
  step_fn = train_step.jit_train_step(model, tx, config, lr_fn, mesh, shardings)
  hlo = step_fn.lower(state, batch).compile().as_text()
  split = {}
  flat = jax.tree_util.tree_flatten_with_path(abstract.params)[0]
  specs = jax.tree_util.tree_leaves(shardings.params,
                                    is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  for (path, leaf), sharding in zip(flat, specs, strict=True):
    if not sharding.is_fully_replicated:
      split[jax.tree_util.keystr(path, simple=True, separator='/')] = tuple(leaf.shape)
  return hlo, split, dict(mesh.shape)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.devices:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}')
    os.environ['JAX_PLATFORMS'] = 'cpu'
  hlo, split, mesh_shape = compile_step(args)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(hlo)
  found = full_weight_all_reduces(hlo, split)
  ops: dict[str, int] = {}
  for op, _ in collectives(hlo):
    ops[op] = ops.get(op, 0) + 1
  import jax  # pylint: disable=g-import-not-at-top
  report = {'backend': jax.default_backend(), 'mesh': mesh_shape, 'split_params': len(split),
            'collectives': ops, 'full_size_weight_all_reduces': found}
  if args.json:
    print(json.dumps(report, indent=2, sort_keys=True))
  else:
    print(f'{report["backend"]} mesh {mesh_shape}: {len(split)} split parameters; collectives '
          f'{ops}; {len(found)} split parameters have a full-size all-reduce'
          + (f' (e.g. {sorted(found)[0]})' if found else ''))
  if args.expect_full_all_reduce:
    return 0 if found else 1
  return 1 if found else 0


if __name__ == '__main__':
  sys.exit(main())
