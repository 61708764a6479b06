"""Speed of the OGFR train step and of evaluation feature extraction, with FLOPs and MFU.

  python -m ogfr_jax.bench --size base --batch 64 --dtype bfloat16 --json bench.json
  python -m ogfr_jax.bench --size tiny --height 128 --width 64 --batch 32 \
      --torch-python /path/to/torch-venv/bin/python

What is timed is what training and evaluation run: `train_step.train_step` jitted with the
trainer's shardings (`train_step.jit_train_step` over a mesh of all local devices, state from
`train_state.create_sharded_state`), and the jitted student extraction of `evaluate.py`, on random
inputs of the pipeline's shapes and dtypes (uint8 pixels). Compilation and --warmup calls are untimed; each of
--repeats timed repeats runs --steps calls back to back and waits for the device only at its
end, so no host sync sits between steps. Step time is the repeat's time / --steps; the report
gives the median, min and max over repeats.

FLOPs come from XLA's cost analysis of the compiled program (one device's share, times the
device count). MFU = achieved FLOP/s / (per-device dense peak x devices), where the peak is
known for the device kind and dtype (PEAK_FLOPS, vendor figures) or given with --peak-flops;
otherwise (a CPU, say) it is reported as null. Peak memory is the device's
`peak_bytes_in_use` where the backend reports it, else the process's peak RSS (which includes
compilation), labelled as such.

With --torch-python, `benchmarks/torch_reference.py` (PyTorch + timm, the same step) runs in
that interpreter first, with the same shapes, and the report adds its row and the ratios
ogfr_jax / torch of step time and images/s. The two never run at the same time.

Measured on the 2-core development VM (jax 0.10.2 CPU, float32; torch 2.14.1 + timm 1.0.31,
2 threads, OMP_WAIT_POLICY=PASSIVE), nothing else running (figures and commands for each
change are in WORKSPACE.md, "Performance"):
  python -m ogfr_jax.bench --size base --stride 12 --batch 8 --steps 1 --repeats 5 --warmup 1
      --torch-python ...
    train 12.10 s median [11.98, 12.21], 1.719 TFLOP/step (XLA), peak RSS 5.1 GiB; torch
    12.27 s [11.98, 12.90], 1.883 TFLOP counted, 4.6 GiB; step time ratio 0.986 (a second
    invocation: 11.86 s against 12.13 s, 0.977). The FLOPs differ because the last block of
    each branch computes only the CLS row here (timm runs every row); before that change, at
    equal FLOPs, three invocations gave 1.02-1.17.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from ogfr_jax import config_defaults
from ogfr_jax import evaluate
from ogfr_jax import optim
from ogfr_jax import parallel
from ogfr_jax import precision
from ogfr_jax import train_state
from ogfr_jax import train_step
from ogfr_jax.data import donor_exchange
from ogfr_jax.models import build
from ogfr_jax.models import vit as vit_lib

TORCH_REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'benchmarks', 'torch_reference.py')
WHAT = ('train', 'eval')

# Dense (no structured sparsity) peak FLOP/s per device, from the vendors' datasheets:
# NVIDIA H100 (SXM5: BF16 989.4 T, TF32 494.7 T; PCIe: 756.5 T / 378 T; NVL: 835.5 T / 417.5 T
# -- the datasheets print twice these "with sparsity"), H200 (the H100 SXM's compute: 989.4 T /
# 494.7 T), A100 (BF16 312 T, TF32 156 T); Google Cloud TPU docs, BF16 per chip: v4 275 T,
# v5e 197 T, v5p 459 T, v6e (Trillium) 918 T.
# 'float32' means what a float32 model runs at with JAX's default matmul precision: TF32 tensor
# cores on NVIDIA GPUs (the plain FP32 peak is ~67 T on an H100 SXM), and one bfloat16 pass on
# TPUs, so a TPU's float32 peak is its bfloat16 one.
# Each entry: (substrings that must all be in device_kind, lower-cased), label, peaks. First
# match wins, so the more specific entries come first.
PEAK_FLOPS = (
    (('h100', 'pcie'), 'NVIDIA H100 PCIe', {'bfloat16': 756.5e12, 'float32': 378e12}),
    (('h100', 'nvl'), 'NVIDIA H100 NVL', {'bfloat16': 835.5e12, 'float32': 417.5e12}),
    (('h100',), 'NVIDIA H100 SXM', {'bfloat16': 989.4e12, 'float32': 494.7e12}),
    (('h200',), 'NVIDIA H200', {'bfloat16': 989.4e12, 'float32': 494.7e12}),
    (('a100',), 'NVIDIA A100', {'bfloat16': 312e12, 'float32': 156e12}),
    (('tpu v4',), 'TPU v4', {'bfloat16': 275e12, 'float32': 275e12}),
    (('tpu v5 lite',), 'TPU v5e', {'bfloat16': 197e12, 'float32': 197e12}),
    (('tpu v5e',), 'TPU v5e', {'bfloat16': 197e12, 'float32': 197e12}),
    (('tpu v5p',), 'TPU v5p', {'bfloat16': 459e12, 'float32': 459e12}),
    (('tpu v5',), 'TPU v5p', {'bfloat16': 459e12, 'float32': 459e12}),
    (('tpu v6',), 'TPU v6e', {'bfloat16': 918e12, 'float32': 918e12}),
)


# --------------------------------------------------------------------------------------------
# Command line and config


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m ogfr_jax.bench',
                              description=__doc__.splitlines()[0])
  p.add_argument('--config', default='',
                 help='configs/NAME.py[:ARG]: start from its get_config(ARG) instead of the '
                      'base config; the flags below override it')
  p.add_argument('--size', choices=sorted(config_defaults.VIT_SIZES), default=None,
                 help='model.size (default: the config\'s, base)')
  p.add_argument('--patch', type=int, default=None, help='model.patch_size')
  p.add_argument('--stride', type=int, default=None, help='model.stride')
  p.add_argument('--height', type=int, default=None, help='input.height (default 256)')
  p.add_argument('--width', type=int, default=None, help='input.width (default 128)')
  p.add_argument('--batch', type=int, default=None,
                 help='global train batch, a multiple of input.images_per_id (default: P x K)')
  p.add_argument('--eval-batch', type=int, default=None, help='global eval batch (default: '
                 '--batch)')
  p.add_argument('--dtype', choices=['float32', 'bfloat16', 'auto'], default=None,
                 help='model.dtype')
  p.add_argument('--attention', choices=['xla', 'cudnn', 'auto'], default=None,
                 help='model.attention_impl')
  p.add_argument('--remat', choices=list(vit_lib.REMAT_CHOICES), default=None,
                 help='model.remat')
  p.add_argument('--num-classes', type=int, default=702, help='training identities')
  p.add_argument('--num-cameras', type=int, default=6)
  p.add_argument('--what', default='train,eval', help='comma-separated: train, eval')
  p.add_argument('--steps', type=int, default=10, help='steps per timed repeat')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2, help='untimed calls after compilation')
  p.add_argument('--peak-flops', type=float, default=None,
                 help='dense peak FLOP/s of one device (overrides the built-in table)')
  p.add_argument('--torch-python', default='',
                 help='a Python with torch and timm: also run benchmarks/torch_reference.py')
  p.add_argument('--torch-threads', type=int, default=0, help='0: all cores')
  p.add_argument('--json', default='', help="write the result here ('-': print it as the "
                                            "last stdout line)")
  args = p.parse_args(argv)
  what = [w.strip() for w in args.what.split(',') if w.strip()]
  bad = [w for w in what if w not in WHAT]
  if bad or not what:
    p.error(f'--what={args.what!r}: use a comma-separated subset of {",".join(WHAT)}')
  args.what = what
  for name in ('steps', 'repeats'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be >= 1')
  if args.warmup < 0:
    p.error('--warmup must be >= 0')
  return args


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """get_config(ARG) of 'path/to/file.py[:ARG]' (the main entry's --config syntax)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'--config {path}: no such file')
  module_spec = importlib.util.spec_from_file_location('_bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'--config {path}: the file defines no get_config')
  return module.get_config(arg or None)


def build_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The config to benchmark: base (or --config) with the command line's overrides."""
  c = load_config_file(args.config) if args.config else config_defaults.base_config()
  m = c.model
  for flag, field in (('size', 'size'), ('patch', 'patch_size'), ('stride', 'stride'),
                      ('dtype', 'dtype'), ('attention', 'attention_impl'), ('remat', 'remat')):
    value = getattr(args, flag, None)
    if value is not None:
      m[field] = value
  if args.height is not None:
    c.input.height = args.height
  if args.width is not None:
    c.input.width = args.width
  k = c.input.images_per_id
  if args.batch is not None:
    if args.batch < k or args.batch % k:
      raise ValueError(f'--batch={args.batch} must be a positive multiple of '
                       f'input.images_per_id={k} (the P x K sampler)')
    c.input.ids_per_batch = args.batch // k
  c.mesh.data = -1  # every local device not taken by fsdp
  if getattr(args, 'torch_python', None):
    for field, value in PAPER_AGENT.items():
      section, name = field.split('.')
      c[section][name] = value
  return c


def train_batch_size(config) -> int:
  return config.input.ids_per_batch * config.input.images_per_id


def random_pixels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  return rng.integers(0, 256, shape, dtype=np.uint8)


def random_batch(config, batch: int, num_classes: int, num_cameras: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A train batch of the pipeline's shapes and dtypes: P ids x K images of random uint8
  pixels (the step normalises them on the device)."""
  h, w = config.input.height, config.input.width
  k = config.input.images_per_id
  pids = np.repeat(np.arange(batch // k), k) % num_classes
  out = {
      'image': random_pixels(rng, (batch, h, w, 3)),
      'occluded': random_pixels(rng, (batch, h, w, 3)),
      'pattern': rng.integers(0, build.num_patterns(config), batch).astype(np.int32),
      'pid': pids.astype(np.int32),
      'camid': rng.integers(0, num_cameras, batch).astype(np.int32),
  }
  keys = train_step.step_keys(config)
  if 'occ_mask' in keys:
    out['occ_mask'] = (rng.random((batch, h, w)) < 0.3).astype(np.uint8)
  if 'contam_mask' in keys:
    out['contam_mask'] = np.zeros((batch, h, w), np.uint8)
  if 'index' in keys:  # the training image of each row (the identity memory's slots)
    out['index'] = np.arange(batch, dtype=np.int32)
  if donor_exchange.on_device(config):
    # The paste's gather and select run whatever the donors, so none costs the same.
    out.update(donor_exchange.no_donors(np.arange(batch)))
  return out


# --------------------------------------------------------------------------------------------
# Shapes only: the train step and the evaluation lowered without any array (memory analysis,
# lowering for another platform)


def batch_spec(config, batch: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes, dtypes and shardings of the train batch the step of `config` reads."""
  h, w = config.input.height, config.input.width
  shapes = {'image': ((batch, h, w, 3), np.uint8), 'occluded': ((batch, h, w, 3), np.uint8),
            'pattern': ((batch,), np.int32), 'pid': ((batch,), np.int32),
            'camid': ((batch,), np.int32), 'index': ((batch,), np.int32),
            'occ_mask': ((batch, h, w), np.uint8), 'contam_mask': ((batch, h, w), np.uint8)}
  shapes.update({k: (v.shape, v.dtype) for k, v in
                 donor_exchange.no_donors(np.arange(batch)).items()})
  sharding = parallel.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shapes[k][0], shapes[k][1], sharding=sharding)
          for k in train_step.step_keys(config)}


def abstract_train_step(config, num_classes: int, num_cameras: int, mesh,
                        platform: Optional[str] = None):
  """(jitted train step, abstract state, abstract batch) of `config` at its global batch,
  for `platform` (default: this process's). Nothing is initialised: the state is shapes and
  shardings (jax.eval_shape)."""
  batch_size = train_batch_size(config)
  parallel.batch_size_per_device_check(batch_size, mesh, 'the train batch')
  model = build.build_model(config, num_classes, num_cameras)
  tx, lr_fn = optim.make_optimizer(config, batch_size, 100, 10_000)
  init = functools.partial(train_state.init_state, model, tx, config)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  shardings = parallel.state_shardings(abstract, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  step = train_step.jit_train_step(model, tx, config, lr_fn, mesh, shardings,
                                   platform=platform)
  return step, state, batch_spec(config, batch_size, mesh), model


def step_memory(config, num_classes: int, num_cameras: int, mesh) -> dict[str, int]:
  """Bytes per device of the compiled train step from XLA's memory analysis: temporaries,
  arguments (state and batch), outputs, and the outputs aliased to donated arguments."""
  step, state, batch, _ = abstract_train_step(config, num_classes, num_cameras, mesh)
  analysis = step.lower(state, batch).compile().memory_analysis()
  return {'temp': int(analysis.temp_size_in_bytes),
          'argument': int(analysis.argument_size_in_bytes),
          'output': int(analysis.output_size_in_bytes),
          'alias': int(analysis.alias_size_in_bytes)}


# --------------------------------------------------------------------------------------------
# Measurements


def cost_flops(compiled) -> Optional[float]:
  """FLOPs of a compiled program (one device's share) from XLA's cost analysis, or None.

  `cost_analysis()` returns a dict in recent jax and a list with one dict per program in older
  ones; some backends return None or leave out 'flops'.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  flops = float(cost['flops'])
  return flops if np.isfinite(flops) and flops > 0 else None


def peak_flops(device_kind: str, dtype: str) -> tuple[Optional[float], str]:
  """(dense peak FLOP/s of one device, where the figure comes from); (None, why) if unknown."""
  kind = device_kind.lower()
  for needles, label, peaks in PEAK_FLOPS:
    if all(n in kind for n in needles):
      return peaks[dtype], f'{label} {dtype} dense peak (vendor datasheet)'
  return None, f'unknown for device kind {device_kind!r}'


def mfu(flops_per_step: Optional[float], step_s: float,
        peak_per_device: Optional[float], num_devices: int) -> Optional[float]:
  """Achieved FLOP/s over the devices' peak; None when either side is unknown."""
  if not flops_per_step or not peak_per_device or step_s <= 0:
    return None
  return flops_per_step / step_s / (peak_per_device * num_devices)


def peak_memory() -> dict[str, Any]:
  """Peak memory so far: the largest device peak_bytes_in_use, else the process's peak RSS."""
  per_device = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      per_device.append(int(stats['peak_bytes_in_use']))
  if per_device:
    return {'bytes': max(per_device),
            'source': f'device peak_bytes_in_use (max over {len(per_device)} devices)'}
  # Linux reports ru_maxrss in KiB.
  return {'bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          'source': 'process peak RSS (no device memory stats; includes compilation)'}


def time_repeats(call: Callable[[], Any], steps: int, repeats: int, *,
                 chained: bool) -> list[float]:
  """Per-step seconds of each repeat of `steps` calls; the host waits only at a repeat's end.

  chained: each call consumes the previous call's outputs (the train state, donated), so the
  last output being ready means all are; otherwise every call's output is kept and waited on.
  """
  times = []
  for _ in range(repeats):
    outs = []
    start = time.perf_counter()
    for _ in range(steps):
      out = call()
      outs = [out] if chained else outs + [out]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - start) / steps)
  return times


def _timing_summary(times: list[float], batch: int, flops_per_step: Optional[float],
                    peak_per_device: Optional[float], num_devices: int) -> dict[str, Any]:
  median = float(np.median(times))
  return {
      'step_s': {'median': median, 'min': float(np.min(times)), 'max': float(np.max(times)),
                 'all': [float(t) for t in times]},
      'images_per_s': batch / median,
      'flops_per_step': flops_per_step,
      'flops_per_image': flops_per_step / batch if flops_per_step else None,
      'achieved_flops_per_s': flops_per_step / median if flops_per_step else None,
      'mfu': mfu(flops_per_step, median, peak_per_device, num_devices),
  }


def bench_train(config, args, mesh, peak_per_device: Optional[float]) -> tuple[dict, Any]:
  """Times the jitted train step; returns (report, final train state)."""
  batch_size = train_batch_size(config)
  parallel.batch_size_per_device_check(batch_size, mesh, '--batch')
  model = build.build_model(config, args.num_classes, args.num_cameras)
  tx, lr_fn = optim.make_optimizer(config, batch_size, 100, 10_000)
  state, abstract, shardings = train_state.create_sharded_state(model, tx, config, mesh,
                                                          jax.random.PRNGKey(config.seed))
  n_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract.params)))
  batch = parallel.global_batch(
      random_batch(config, batch_size, args.num_classes, args.num_cameras,
                   np.random.default_rng(0)), mesh)
  step_fn = train_step.jit_train_step(model, tx, config, lr_fn, mesh, shardings)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  flops = cost_flops(compiled)
  flops = flops * mesh.size if flops else None

  holder = {'state': state, 'metrics': None}

  def one_step():
    holder['state'], holder['metrics'] = compiled(holder['state'], batch)
    return holder['state'], holder['metrics']

  for _ in range(args.warmup):
    one_step()
  jax.block_until_ready(holder['state'])
  times = time_repeats(one_step, args.steps, args.repeats, chained=True)
  loss = float(holder['metrics']['loss/total'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'non-finite loss {loss} in the benchmarked train step')
  report = {'compile_s': compile_s, 'batch': batch_size, 'params': n_params,
            **_timing_summary(times, batch_size, flops, peak_per_device, mesh.size),
            'loss': loss, 'peak_memory': peak_memory()}
  return report, (model, holder['state'])


def bench_eval(config, args, mesh, peak_per_device: Optional[float],
               model_and_state=None) -> dict:
  """Times `evaluate.make_extract_fn` (the student's jitted inference) on random images."""
  batch_size = args.eval_batch or train_batch_size(config)
  parallel.batch_size_per_device_check(batch_size, mesh, '--eval-batch')
  if model_and_state is None:
    model = build.build_model(config, args.num_classes, args.num_cameras)
    tx, _ = optim.make_optimizer(config, batch_size, 100, 10_000)
    state, _, _ = train_state.create_sharded_state(model, tx, config, mesh,
                                             jax.random.PRNGKey(config.seed))
  else:
    model, state = model_and_state
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  rng = np.random.default_rng(1)
  h, w = config.input.height, config.input.width
  arrays = parallel.global_batch(
      {'image': random_pixels(rng, (batch_size, h, w, 3)),
       'camid': rng.integers(0, args.num_cameras, batch_size).astype(np.int32)}, mesh)
  extract_fn = evaluate.make_extract_fn(model, config, mesh)
  start = time.perf_counter()
  compiled = extract_fn.lower(variables, arrays['image'], arrays['camid']).compile()
  compile_s = time.perf_counter() - start
  flops = cost_flops(compiled)
  flops = flops * mesh.size if flops else None

  def one_call():
    return compiled(variables, arrays['image'], arrays['camid'])

  for _ in range(args.warmup):
    jax.block_until_ready(one_call())
  times = time_repeats(one_call, args.steps, args.repeats, chained=False)
  return {'compile_s': compile_s, 'batch': batch_size,
          **_timing_summary(times, batch_size, flops, peak_per_device, mesh.size),
          'peak_memory': peak_memory()}


# --------------------------------------------------------------------------------------------
# The PyTorch reference


def check_torch_python(path: str) -> str:
  """The interpreter's full path; ValueError naming `path` unless it is an executable (a path
  or a name on PATH) that imports torch and timm."""
  resolved = shutil.which(path)
  if resolved is None:
    raise ValueError(f'--torch-python {path}: no such executable')
  probe = subprocess.run([resolved, '-c', 'import torch, timm'], capture_output=True,
                         text=True, check=False)
  if probe.returncode:
    last = (probe.stderr.strip().splitlines() or ['(no message)'])[-1]
    raise ValueError(f'--torch-python {path}: cannot import torch and timm there: {last}')
  return resolved


# The paper's agent, which torch_reference.py implements: a self-critical baseline over one
# sampled action, no consistency labels, no score window. With --torch-python both sides run it.
PAPER_AGENT = {
    'fepm.baseline': 'self_critical', 'fepm.num_samples': 1, 'fepm.score_window': (1, 1),
    'fepm.consistency_memory': 0, 'loss.agent_consistency_weight': 0.0,
}
# Config choices that change the step's work and that torch_reference.py mirrors only at
# these values.
_MIRRORED = {
    'model.teacher': True, 'model.jpm': False,
    'model.pattern_embed': True, 'fepm.enabled': True, 'fepm.selection': 'agent',
    'optim.grad_clip': 0.0, **PAPER_AGENT,
}


def torch_mismatches(config) -> list[str]:
  """The config fields whose values torch_reference.py does not reproduce."""
  out = []
  for field, expected in _MIRRORED.items():
    section, name = field.split('.')
    value = config[section].get(name, expected)
    if value != expected:
      out.append(f'{field}={value!r} (the reference mirrors {expected!r})')
  if config.optim.name not in ('sgd', 'adamw'):
    out.append(f'optim.name={config.optim.name!r}')
  return out


def torch_command(python: str, config, args) -> list[str]:
  """The reference's command line for this config's shapes and choices."""
  batch = train_batch_size(config)
  m = config.model
  return [
      python, TORCH_REFERENCE, '--size', m.size, '--patch', str(m.patch_size),
      '--stride', str(m.stride), '--height', str(config.input.height),
      '--width', str(config.input.width), '--batch', str(batch),
      '--images-per-id', str(config.input.images_per_id),
      '--num-classes', str(args.num_classes), '--num-cameras', str(max(args.num_cameras, 1)),
      '--num-patterns', str(build.num_patterns(config)),
      '--mlp-ratio', str(m.mlp_ratio), '--drop-path', str(m.drop_path),
      '--sie-weight', str(m.sie_weight if m.sie else 0.0),
      '--fepm-layer', str(build.fepm_layer(config)),
      '--agent-hidden', str(config.fepm.agent_hidden),
      '--prior-logit', str(config.fepm.prior_logit),
      '--optimizer', config.optim.name,
      '--lr', str(config.optim.lr * batch / config.optim.base_batch_size),
      '--weight-decay', str(config.optim.weight_decay),
      '--threads', str(args.torch_threads),
      '--steps', str(args.steps), '--repeats', str(args.repeats),
      '--warmup', str(args.warmup),
  ] + (['--amp'] if m.dtype == 'bfloat16' else [])


def run_torch_reference(python: str, config, args) -> dict:
  """Runs the reference to completion and returns its JSON report."""
  cmd = torch_command(python, config, args)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'{TORCH_REFERENCE} under {python} failed (exit {proc.returncode}):\n'
                       f'{proc.stderr.strip()[-3000:]}')
  lines = [l for l in proc.stdout.strip().splitlines() if l.startswith('{')]
  if not lines:
    raise RuntimeError(f'{TORCH_REFERENCE} under {python} printed no JSON:\n{proc.stdout}')
  result = json.loads(lines[-1])
  result['command'] = ' '.join(cmd)
  return result


def compare(ours: dict, reference: dict) -> dict:
  """Ratios ogfr_jax / torch (step time < 1 and images/s > 1 mean ogfr_jax is faster)."""
  out = {'step_time': ours['step_s']['median'] / reference['step_s']['median'],
         'images_per_s': ours['images_per_s'] / reference['images_per_s']}
  if ours.get('flops_per_step') and reference.get('flops_per_step'):
    out['flops_per_step'] = ours['flops_per_step'] / reference['flops_per_step']
  return out


# --------------------------------------------------------------------------------------------
# Report


def _cell(value: Optional[float], spec: str, width: int) -> str:
  """`value` formatted with `spec` and right-aligned in `width`, or '-' when unknown."""
  return (format(value, spec) if value is not None else '-').rjust(width)


def format_table(result: dict) -> str:
  """The human-readable report."""
  c = result['config']
  lines = [f"{c['size']} ({c['dim']}x{c['depth']}, {c['tokens']} tokens) {c['height']}x"
           f"{c['width']} {c['dtype']} attention={c['attention']} on {c['num_devices']}x "
           f"{c['device_kind']} ({c['platform']}); peak/device: "
           f"{_cell(result['peak_flops_per_device'], '.4g', 0)} FLOP/s "
           f"({result['peak_flops_source']})",
           f"{'':14s} {'batch':>5s} {'compile s':>9s} {'step s median [min, max]':>28s} "
           f"{'img/s':>9s} {'GFLOP/step':>11s} {'TFLOP/s':>8s} {'MFU':>6s}  peak memory"]
  rows = [(f'ogfr_jax {k}', result[k]) for k in WHAT if k in result]
  if 'torch' in result:
    rows.append(('torch train', result['torch']))
  for name, r in rows:
    s = r['step_s']
    mem = r.get('peak_memory') or {'bytes': r.get('peak_memory_bytes'),
                                   'source': r.get('peak_memory_source')}
    flops = r.get('flops_per_step')
    achieved = flops / s['median'] if flops else None
    spread = f"{s['median']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"
    lines.append(
        f"{name:14s} {r['batch']:5d} {_cell(r.get('compile_s'), '.1f', 9)} {spread:>28s} "
        f"{r['images_per_s']:9.1f} {_cell(flops and flops / 1e9, '.2f', 11)} "
        f"{_cell(achieved and achieved / 1e12, '.3f', 8)} {_cell(r.get('mfu'), '.1%', 6)}  "
        f"{mem['bytes'] / 2**30:.2f} GiB ({mem['source']})")
  if 'ratio' in result:
    ratio = result['ratio']
    t = result['torch']
    lines.append(f"ogfr_jax / torch: step time x{ratio['step_time']:.3f}, images/s "
                 f"x{ratio['images_per_s']:.3f}"
                 + (f", FLOPs (XLA / torch counter) x{ratio['flops_per_step']:.3f}"
                    if 'flops_per_step' in ratio else '')
                 + f"  [torch {t['torch_version']}, timm {t['timm_version']}, "
                   f"{t['threads']} threads, OMP_WAIT_POLICY={t.get('omp_wait_policy')}, "
                   f"{t['device']}, amp={t['amp']}]")
    if 'train' in result and result['train'].get('params') != t.get('params'):
      lines.append(f"note: parameter counts differ: ogfr_jax {result['train'].get('params')}, "
                   f"torch {t.get('params')}")
  return '\n'.join(lines)


def run(args: argparse.Namespace) -> dict:
  """The whole benchmark for parsed arguments; returns the JSON-ready result."""
  config = precision.resolve(build_config(args))  # 'auto' dtype/attention for this backend
  if config.model.attention_impl == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError(f'--attention cudnn needs an NVIDIA GPU; this run has '
                     f'{jax.default_backend()} devices')
  reference = None
  if args.torch_python:
    python = check_torch_python(args.torch_python)
    problems = torch_mismatches(config)
    if problems:
      raise ValueError('the PyTorch reference does not mirror this config: '
                       + '; '.join(problems))
    # The reference runs first and alone: it never competes with JAX for cores or memory.
    reference = run_torch_reference(python, config, args)

  mesh = parallel.make_mesh(config.mesh)
  device = jax.local_devices()[0]
  dtype = config.model.dtype
  if args.peak_flops is not None:
    peak, source = args.peak_flops, '--peak-flops'
  else:
    peak, source = peak_flops(device.device_kind, dtype)
  dim, depth, heads = build.vit_size(config)
  gh, gw = build.token_grid(config)
  result: dict[str, Any] = {
      'config': {
          'size': config.model.size, 'dim': dim, 'depth': depth, 'heads': heads,
          'patch': config.model.patch_size, 'stride': config.model.stride,
          'height': config.input.height, 'width': config.input.width,
          'tokens': 1 + gh * gw, 'dtype': dtype,
          'attention': config.model.attention_impl,
          'remat': config.model.remat,
          'config_file': args.config or None,
          'num_devices': mesh.size, 'mesh': dict(mesh.shape),
          'device_kind': device.device_kind, 'platform': device.platform,
          'jax_version': jax.__version__,
          'steps': args.steps, 'repeats': args.repeats, 'warmup': args.warmup,
      },
      'peak_flops_per_device': peak, 'peak_flops_source': source,
  }
  model_and_state = None
  if 'train' in args.what:
    result['train'], model_and_state = bench_train(config, args, mesh, peak)
  if 'eval' in args.what:
    result['eval'] = bench_eval(config, args, mesh, peak, model_and_state)
  if reference is not None:
    if reference.get('dim') != dim or reference.get('depth') != depth:
      raise RuntimeError(f"the PyTorch reference built {reference.get('dim')}x"
                         f"{reference.get('depth')} for size {config.model.size!r}, ogfr_jax "
                         f"{dim}x{depth}: update VIT_SIZES in {TORCH_REFERENCE}")
    result['torch'] = reference
    if 'train' in result:
      result['ratio'] = compare(result['train'], reference)
  return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  try:
    result = run(args)
  except (ValueError, RuntimeError, FloatingPointError) as e:
    raise SystemExit(f'error: {e}') from None
  print(format_table(result))
  if args.json == '-':
    print(json.dumps(result))
  elif args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main(sys.argv[1:])
