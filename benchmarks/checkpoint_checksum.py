"""Cost of the checkpoint checksums on the train state of a ViT-B OGFR run.

  python benchmarks/checkpoint_checksum.py                 # ViT-B, 256x128, AdamW state
  python benchmarks/checkpoint_checksum.py --size small --repeats 5 --json

The state has the shapes of the real TrainState (teacher, student, agent, AdamW moments),
from jax.eval_shape of train_state.init_state, filled with random values on the devices.
Reports the state size, the time of `checkpoints.state_checksums` (computed once per save
and once per restore: one pass over the state on its devices and a host sync), and for
scale the time of a checkpoint save (until the write is on disk) and of a verified restore
into a fresh folder under --dir.

Measured (2-core CPU VM shared with other work, 1 CPU device, `--dir /tmp/...`): ViT-B state
(650 arrays, 1.38 GB) checksums in 0.80 s median of 3 (1.7 GB/s; 6.9 s to compile the
per-shape programs once per process); a synchronous save with checksums 18.3 s (checksums
~4% of it); a verified restore 19.5 s. On accelerators the pass runs on the devices that
hold the state, at memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

import jax

from ogfr_jax import checkpoints
from ogfr_jax import config_defaults
from ogfr_jax import optim
from ogfr_jax import train_state
from ogfr_jax.models import build


def abstract_state(size: str, num_classes: int):
  c = config_defaults.base_config()
  c.model.size = size
  c.input.height, c.input.width = 256, 128
  model = build.build_model(c, num_classes, 6)
  tx, _ = optim.make_optimizer(c, 64, 100, 1000)
  return jax.eval_shape(lambda r: train_state.init_state(model, tx, c, r),
                        jax.random.PRNGKey(0))


def random_like(abstract, seed: int = 0):
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  out = []
  for key, leaf in zip(keys, leaves):
    if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
      out.append(jax.random.normal(key, leaf.shape, leaf.dtype))
    else:
      out.append(jax.random.randint(key, leaf.shape, 0, 1000).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _timed(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--size', default='base', choices=sorted(config_defaults.VIT_SIZES))
  p.add_argument('--num_classes', type=int, default=702)  # DukeMTMC / Occluded-Duke
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--dir', default=None, help='where the timed checkpoint goes (a temp dir)')
  p.add_argument('--no_save', action='store_true', help='only time the checksums')
  p.add_argument('--json', action='store_true')
  args = p.parse_args(argv)

  abstract = abstract_state(args.size, args.num_classes)
  state = random_like(abstract)
  jax.block_until_ready(state)
  leaves = [x for x in jax.tree_util.tree_leaves(state) if hasattr(x, 'shape')]
  nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
  t = time.perf_counter()
  checkpoints.state_checksums(state)  # compiles
  compile_s = time.perf_counter() - t
  sums = _timed(lambda: checkpoints.state_checksums(state), args.repeats)
  out = {'size': args.size, 'arrays': len(leaves), 'state_bytes': int(nbytes),
         'devices': f'{jax.device_count()} x {jax.devices()[0].platform}',
         'checksum_compile_s': compile_s, 'checksum_s_median': statistics.median(sums),
         'checksum_s_all': sums,
         'checksum_gb_per_s': nbytes / 1e9 / statistics.median(sums)}
  if not args.no_save:
    folder = tempfile.mkdtemp(prefix='ckpt-bench-', dir=args.dir)
    try:
      manager = checkpoints.make_manager(folder, async_save=False)
      t = time.perf_counter()
      checkpoints.save(manager, 1, state, {'step': 1}, force=True)
      manager.wait_until_finished()
      out['save_s_with_checksums'] = time.perf_counter() - t
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
      t = time.perf_counter()
      restored, _, step = checkpoints.restore_newest(manager, target)
      jax.block_until_ready(restored)
      out['restore_s_verified'] = time.perf_counter() - t
      assert step == 1
      manager.close()
    finally:
      shutil.rmtree(folder, ignore_errors=True)
  if args.json:
    print(json.dumps(out, indent=2))
  else:
    print(f'{args.size} OGFR train state: {len(leaves)} arrays, {nbytes / 2**30:.2f} GiB on '
          f'{out["devices"]}')
    print(f'checksums: {out["checksum_s_median"]:.3f} s median of {args.repeats} '
          f'({out["checksum_gb_per_s"]:.2f} GB/s; compile {compile_s:.2f} s)')
    if 'save_s_with_checksums' in out:
      share = out['checksum_s_median'] / out['save_s_with_checksums']
      print(f'save (synchronous, on disk) {out["save_s_with_checksums"]:.2f} s, of which the '
            f'checksums are {share:.0%}; verified restore {out["restore_s_verified"]:.2f} s')
  return out


if __name__ == '__main__':
  main()
