"""A rehearsal of the real job on one machine: a dataset of the real size in the real layout,
a ViT-B/16 file in timm's names, the real config through `python -m ogfr_jax.main`, every
stage timed, and the cost of the full recipe projected onto accelerators.

    python benchmarks/rehearsal.py [--preset occluded_duke|market1501|msmt17] [--steps 4]
        [--batch 2x4] [--kill-after 1] [--eval-query 128] [--eval-gallery 128]
        [--json rehearsal.json]

Stages, in order:
  data     A synthetic dataset with the preset's counts (identities and images per split,
           cameras), drawn by the embedded generator's renderer (data/synthetic_render.py) at
           256x128, written once as JPEGs in the Occluded-Duke layout and names
           (<root>/Occluded_Duke/{bounding_box_train,query,bounding_box_test}/
           0001_c2_f0000001.jpg) and cached under $OGFR_JAX_CACHE/rehearsal.
  weights  A ViT-B/16 (224x224, 14x14 grid) state dict in timm's key names with random values,
           written with numpy + safetensors, and loaded through --config.init_from (resampled
           to the run's grid, as ImageNet weights are).
  scan     The dataset reader and pid relabelling (`loading.load_data`) and one epoch of the
           P x K sampler over the training identities, in this process.
  input    The training input pipeline of the recipe (decode, augment, occlusion synthesis) in
           this process with no workers: images per CPU-second is the rate of one host core.
  train    `python -m ogfr_jax.main --config CONFIG` in a subprocess, overriding only the
           dataset root, init_from, the schedule length (1 epoch of --steps steps), the batch
           (--batch, said in the report) and log_every=1 (a metrics row per step, for timing).
           SIGTERM once step --kill-after is logged (the
           preemption path: checkpoint, exit 143), then the same command again resumes and
           finishes, with its final evaluation on a bounded share of the test split
           (--eval-query / --eval-gallery images; symbolic links in a view of the dataset).
  checkpoint  In this process on the run's workdir: restore of the newest step (identity and
           checksums verified), the checksums alone, and a save of the restored state.
  flops    The XLA FLOP count of the train step compiled at the recipe's batch (nothing is
           executed) and of the student feature extraction per image.
  ranking  `evaluate.rank_on_device` over the full query x gallery count with random
           features of the model's width, in a subprocess of its own (its peak memory is its
           own; benchmarks/eval_scale.py's worker).

The report (a table, and JSON with --json) gives seconds per stage, images/s, the peak RSS of
every process, bytes on disk, the input pipeline's rate per host core and the cores one
accelerator needs, and a projection of the full recipe (its epochs, its periodic evaluations
and the final one) for this CPU, one H100 (30% and 50% MFU of 989 TFLOP/s bf16 dense) and a
TPU v5e-8 (8 x 197 TFLOP/s bf16, same MFUs). Assumptions are printed with it.

The run's final evaluation runs the config's evaluators (config.eval.evaluators) on the bounded
share; the projection counts their forwards at full size (the FEPM selection over the gallery,
the teacher's two passes where teacher_purification is named).

Figures from a run are in docs/results.md ("What a run costs").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.rehearsal_data import (LAYOUT_DIR, PRESETS, Counts, cpus,  # noqa: E402
                                       ensure_dataset, log, make_view, write_timm_vit)
from ogfr_jax.data import synthetic  # noqa: E402
from ogfr_jax.models import build  # noqa: E402

H100_BF16_PEAK = 989.4e12  # dense, SXM, vendor datasheet (ogfr_jax.bench.PEAK_FLOPS)
V5E_BF16_PEAK_PER_CHIP = 197e12
V5E_CHIPS = 8
MFUS = (0.3, 0.5)
TARGET_RSS_BYTES = 16e9
TARGET_RANKING_BYTES = 2e9
TARGET_FEED_IMAGES_PER_S = 3300.0
TARGET_HOST_CORES = 16


def _du(path: str) -> int:
  total = 0
  for dirpath, _, files in os.walk(path):
    for f in files:
      p = os.path.join(dirpath, f)
      if not os.path.islink(p):
        total += os.path.getsize(p)
  return total


# --------------------------------------------------------------------------------------------
# The run


def load_config(path: str, overrides: dict):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('rehearsal_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None)
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  return config


def run_overrides(args, view: str, weights: str) -> dict:
  p, k = (int(v) for v in args.batch.split('x'))
  out = {
      'dataset.root': view, 'init_from': weights,
      'train.epochs': 1, 'train.steps_per_epoch': args.steps,
      'input.ids_per_batch': p, 'input.images_per_id': k,
      'train.log_every': 1,
  }
  if args.model_size:
    out['model.size'] = args.model_size
  return out


def main_command(config_path: str, workdir: str, overrides: dict) -> list[str]:
  return ([sys.executable, '-m', 'ogfr_jax.main', '--config', config_path, '--workdir', workdir]
          + [f'--config.{k}={v}' for k, v in overrides.items()])


def vm_hwm_bytes(pid: int | str = 'self') -> int | None:
  """Peak resident memory of a process since its exec (VmHWM). ru_maxrss is not used for
  children: a child forked from this process starts its count at this process's size."""
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _metrics_rows(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_main(cmd: list[str], workdir: str, log_path: str, *, kill_after: int | None,
             stall_s: float, env: dict) -> dict:
  """Runs cmd; the wall time each metrics row was first seen; SIGTERM after step kill_after.

  Returns rc, wall_s, the process's peak RSS (its input workers are separate processes),
  and the rows seen."""
  metrics = os.path.join(workdir, 'metrics.jsonl')
  seen: dict[int, float] = {}
  t0 = time.time()
  with open(log_path, 'w') as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    killed_at = None
    last_change = time.time()
    size, peak = -1, None
    while True:
      pid, status = os.waitpid(proc.pid, os.WNOHANG)
      if pid:
        break
      peak = vm_hwm_bytes(proc.pid) or peak
      time.sleep(0.25)
      try:
        now_size = os.path.getsize(metrics)
      except OSError:
        now_size = -1
      if now_size != size:
        size, last_change = now_size, time.time()
        for row in _metrics_rows(metrics):
          seen.setdefault(int(row['step']), time.time())
      if kill_after is not None and killed_at is None and any(s >= kill_after for s in seen):
        proc.send_signal(signal.SIGTERM)
        killed_at = time.time()
        log(f'  SIGTERM after step {max(seen)}')
      if stall_s and time.time() - last_change > stall_s:
        proc.kill()
        proc.wait()
        raise RuntimeError(f'the run wrote no metrics row for {stall_s:.0f} s; see {log_path}')
  rc = os.waitstatus_to_exitcode(status)
  proc.returncode = rc
  wall = time.time() - t0
  for row in _metrics_rows(metrics):
    seen.setdefault(int(row['step']), time.time())
  return {'rc': rc, 'wall_s': wall, 'start': t0, 'seen': seen, 'killed_at': killed_at,
          'peak_rss_bytes': peak}


# --------------------------------------------------------------------------------------------
# In-process measurements


def measure_scan(config) -> dict:
  from ogfr_jax.data import loading  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import sampler  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  train, _ = loading.load_data(config)
  scan_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  batches = sampler.epoch_batches(train.train.pids, config.input.ids_per_batch,
                                  config.input.images_per_id, config.seed, 0)
  sampler_s = time.perf_counter() - t0
  return {'scan_s': scan_s, 'sampler_epoch_s': sampler_s, 'data': train,
          'sampler_steps_per_epoch': int(batches.shape[0])}


def measure_input(config, split, batches: int, warmup: int = 3) -> dict:
  """The recipe's train pipeline in this process, no workers: the rate of one host core.

  Totals over `batches` batches after `warmup` (grain reads ahead config.input.prefetch
  batches, so single batches are not timed alone). CPU seconds count every thread of this
  process."""
  from ogfr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = config.copy_and_resolve_references()
  cfg.input.num_workers = 0
  it = pipeline.make_train_iterator(split, cfg)
  t0 = time.perf_counter()
  for _ in range(warmup):
    batch = next(it)
  warmup_s = time.perf_counter() - t0
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    batch = next(it)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  close = getattr(it, 'close', None)
  if close:
    close()
  b = int(batch['image'].shape[0])
  return {'batch': b, 'batches': batches, 'warmup_s': warmup_s, 'batch_s': wall / batches,
          'batch_cpu_s': cpu / batches, 'images_per_s': b * batches / wall,
          'images_per_cpu_s': b * batches / cpu}


def measure_checkpoint(config, workdir: str, scratch: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from ogfr_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  s = train.setup(config, workdir)
  setup_s = time.perf_counter() - t0
  try:
    t0 = time.perf_counter()
    state, data_state, step = train.restore_latest(s)
    jax.block_until_ready(state)
    restore_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    checkpoints.state_checksums(state)
    checksum_s = time.perf_counter() - t0
    manager = checkpoints.make_manager(scratch, config=config, train_split=s['train_data'].train)
    try:
      t0 = time.perf_counter()
      checkpoints.save(manager, step, state, data_state or {})
      save_blocking_s = time.perf_counter() - t0  # what the train loop waits for
      manager.wait_until_finished()
      save_s = time.perf_counter() - t0
    finally:
      train.release_manager(manager)
    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                      for x in jax.tree_util.tree_leaves(state) if hasattr(x, 'shape'))
    step_dir = os.path.join(workdir, 'checkpoints', str(step))
    return {'setup_s': setup_s, 'restore_s': restore_s, 'checksum_s': checksum_s,
            'save_s': save_s, 'save_blocking_s': save_blocking_s, 'step': step, 'state_bytes': state_bytes,
            'checkpoint_bytes': _du(step_dir), 'model': s['model'], 'state': state,
            'mesh': s['mesh'], 'num_classes': s['train_data'].num_train_ids,
            'num_cameras': max(s['train_data'].num_cameras, s['test_data'].num_cameras)}
  finally:
    train.release_manager(s['manager'])


def measure_flops(config, model, state, mesh, num_classes: int, recipe_batch: int) -> dict:
  """XLA FLOPs of the train step at the recipe's batch and of one extraction image."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step_cost  # pylint: disable=g-import-not-at-top
  from ogfr_jax import bench  # pylint: disable=g-import-not-at-top
  from ogfr_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from ogfr_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ogfr_jax import optim  # pylint: disable=g-import-not-at-top
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_state  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_step  # pylint: disable=g-import-not-at-top

  cfg = config.copy_and_resolve_references()
  cfg.input.ids_per_batch, cfg.input.images_per_id = recipe_batch // 4, 4
  tx, lr_fn = optim.make_optimizer(cfg, recipe_batch, 100, 10_000)
  abstract = jax.eval_shape(functools.partial(train_state.init_state, model, tx, cfg),
                            jax.random.PRNGKey(0))
  shardings = parallel.state_shardings(abstract, mesh)
  target = checkpoints.abstract_with_shardings(abstract, shardings)
  host = train_step_cost.random_batch(cfg, recipe_batch, num_classes, np.random.default_rng(0))
  shapes = {**train_state.dummy_batch(cfg, recipe_batch), **host}
  # Keys the step reads that neither fabricates are per-row integers (e.g. `index`).
  batch = {k: jax.ShapeDtypeStruct(shapes[k].shape if k in shapes else (recipe_batch,),
                                   shapes[k].dtype if k in shapes else np.int32,
                                   sharding=parallel.batch_sharding(mesh))
           for k in train_step.step_keys(cfg)}
  step_fn = train_step.jit_train_step(model, tx, cfg, lr_fn, mesh, shardings)
  t0 = time.perf_counter()
  compiled = step_fn.lower(target, batch).compile()
  compile_s = time.perf_counter() - t0
  step_flops = bench.cost_flops(compiled)
  del compiled
  b = int(config.input.eval_batch_size)
  h, w = config.input.height, config.input.width
  extract = evaluate.make_extract_fn(model, config, mesh)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  lowered = extract.lower(variables, jax.ShapeDtypeStruct((b, h, w, 3), np.uint8),
                          jax.ShapeDtypeStruct((b,), np.int32))
  t0 = time.perf_counter()
  ecompiled = lowered.compile()
  extract_compile_s = time.perf_counter() - t0
  extract_flops = bench.cost_flops(ecompiled)
  return {'recipe_batch': recipe_batch, 'step_compile_s': compile_s,
          'flops_per_step': step_flops,
          'flops_per_train_image': step_flops / recipe_batch if step_flops else None,
          'extract_compile_s': extract_compile_s,
          'flops_per_eval_image': extract_flops / b if extract_flops else None}


def measure_ranking(counts: Counts, dim: int) -> dict:
  """benchmarks/eval_scale.py's device worker on this preset's test sizes, in a subprocess."""
  code = ('import json, sys; sys.path.insert(0, %r); from benchmarks import eval_scale; '
          'eval_scale.PROBLEMS["rehearsal"] = (%d, %d, %d, %d, %d); '
          'r = eval_scale.run_worker("rehearsal", "device", %d, 256, 100); '
          'from benchmarks.rehearsal import vm_hwm_bytes; '
          'r["peak_rss_mb"] = vm_hwm_bytes() / 2**20; print(json.dumps(r))'
          % (ROOT, counts.query_images, counts.gallery_images, counts.query_ids,
             counts.gallery_ids - counts.query_ids, counts.cameras, dim))
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        check=False, cwd=ROOT)
  if proc.returncode != 0:
    raise RuntimeError(f'the ranking worker failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Figures


def step_times(run: dict, batch: int, first_step: int) -> dict:
  """Per-step wall times from when each metrics row appeared (log_every=1)."""
  seen = run['seen']
  steps = sorted(s for s in seen if s >= first_step)
  if not steps:
    return {'first_step_s': None, 'steps': []}
  first = seen[steps[0]] - run['start']  # start-up, restore, compile and the first step
  later = [seen[b] - seen[a] for a, b in zip(steps, steps[1:])]
  return {'first_step_s': first, 'steps': later, 'batch': batch}


def projection(r: dict, counts_recipe: dict, args) -> dict:
  """Seconds of the full recipe on this CPU, one H100 and a TPU v5e-8."""
  epochs, spe, batch = (counts_recipe['epochs'], counts_recipe['steps_per_epoch'],
                        counts_recipe['batch'])
  train_images = epochs * spe * batch
  q, g, t = counts_recipe['query'], counts_recipe['gallery'], counts_recipe['train']
  periodic = counts_recipe['periodic_evals']
  student_eval = (periodic + 1) * (q + g)
  # The FEPM evaluators on a real dataset (nothing planted): the selection over the gallery
  # (the teacher's first fepm.layer blocks and the agent, counted as a whole forward), and the
  # teacher's clean and purified passes over query + gallery.
  fepm = counts_recipe['fepm_evaluators']
  report = (g if 'fepm_selection' in fepm else 0) + (
      2 * (q + g) if 'teacher_purification' in fepm else 0)
  del t
  eval_images = student_eval + report
  saves = -(-epochs * spe // counts_recipe['checkpoint_every'])
  f_train, f_eval = r['flops']['flops_per_train_image'], r['flops']['flops_per_eval_image']
  fixed = r['scan']['scan_s'] + saves * r['checkpoint']['save_blocking_s']
  out = {'train_images': train_images, 'eval_images': eval_images,
         'eval_images_student': student_eval, 'eval_images_fepm': report,
         'checkpoint_saves': saves, 'targets': {}}
  cpu_train = r['train']['step_s'] / r['train']['batch']
  cpu_eval = r['eval']['s_per_image']
  out['targets']['this CPU (measured rates)'] = {
      'train_s': train_images * cpu_train, 'eval_s': eval_images * cpu_eval,
      'fixed_s': fixed, 'images_per_s': 1 / cpu_train}
  per_core = r['input']['images_per_cpu_s']
  for label, peak in (('1x H100 (989 TFLOP/s bf16)', H100_BF16_PEAK),
                      (f'TPU v5e-{V5E_CHIPS} ({V5E_CHIPS} x 197 TFLOP/s bf16)',
                       V5E_CHIPS * V5E_BF16_PEAK_PER_CHIP)):
    for mfu in MFUS:
      rate = peak * mfu / f_train
      out['targets'][f'{label} @ {mfu:.0%} MFU'] = {
          'train_s': train_images / rate, 'eval_s': eval_images * f_eval / (peak * mfu),
          'fixed_s': fixed, 'images_per_s': rate, 'host_cores_to_feed': rate / per_core}
  for v in out['targets'].values():
    v['total_s'] = v['train_s'] + v['eval_s'] + v['fixed_s']
  return out


def _fmt_s(s: float | None) -> str:
  if s is None:
    return '-'
  if s >= 2 * 86400:
    return f'{s / 86400:.1f} d'
  if s >= 2 * 3600:
    return f'{s / 3600:.1f} h'
  if s >= 120:
    return f'{s / 60:.1f} min'
  return f'{s:.2f} s'


def _fmt_b(n: float | None) -> str:
  return '-' if n is None else f'{n / 1e9:.2f} GB'


def print_report(r: dict) -> None:
  rows = [
      ('dataset', f"{r['counts']['train_images']:,} train / {r['counts']['query_images']:,} query"
                  f" / {r['counts']['gallery_images']:,} gallery images at "
                  f"{r['height']}x{r['width']}, {r['counts']['cameras']} cameras"),
      ('data generation', _fmt_s(r['data']['generate_s']) if r['data']['generate_s']
       else 'cached'),
      ('weights file (timm names)', f"{_fmt_s(r['weights']['write_s'])}, "
                                    f"{_fmt_b(r['weights']['bytes'])}"),
      ('scan + relabel', _fmt_s(r['scan']['scan_s'])),
      ('P x K sampler, one epoch', _fmt_s(r['scan']['sampler_epoch_s'])),
      ('input batch (recipe batch, 1 core)',
       f"{_fmt_s(r['input']['batch_s'])} for {r['input']['batch']} images; "
       f"{r['input']['images_per_cpu_s']:.0f} img per CPU-s"),
      ('run 1: start-up to first step', _fmt_s(r['train']['run1_first_step_s'])),
      ('run 2 (resume): start-up to first step', _fmt_s(r['train']['run2_first_step_s'])),
      ('XLA compile of the step (recipe batch)', _fmt_s(r['flops']['step_compile_s'])),
      ('train step', f"{_fmt_s(r['train']['step_s'])} at batch {r['train']['batch']} "
                     f"({r['train']['images_per_s']:.2f} img/s)"),
      ('checkpoint save (loop waits) / restore / checksum',
       f"{_fmt_s(r['checkpoint']['save_s'])} ({_fmt_s(r['checkpoint']['save_blocking_s'])}) / "
       f"{_fmt_s(r['checkpoint']['restore_s'])} / "
       f"{_fmt_s(r['checkpoint']['checksum_s'])} ({_fmt_b(r['checkpoint']['checkpoint_bytes'])}"
       ' a step)'),
      ('final eval of the bounded share', f"{_fmt_s(r['eval']['wall_s'])} for "
       f"{r['eval']['query']} + {r['eval']['gallery']} images"),
      ('extraction per image', f"{_fmt_s(r['eval']['s_per_image'])} "
                               f"(batches of {r['eval']['batch']}, compile included)"),
      ('ranking full size', f"{r['ranking']['num_query']:,} x {r['ranking']['num_gallery']:,}: "
       f"{_fmt_s(r['ranking']['eval_s'])}, peak RSS "
       f"{_fmt_b(r['ranking']['peak_rss_mb'] * 2**20)}"),
      ('XLA FLOPs', f"{r['flops']['flops_per_train_image'] / 1e9:.1f} GFLOP per train image, "
                    f"{r['flops']['flops_per_eval_image'] / 1e9:.1f} per eval image"),
      ('peak RSS (largest process)', f"{_fmt_b(r['peak_rss_bytes'])} "
       f"({r['peak_rss_process']})"),
      ('bytes on disk', f"data {_fmt_b(r['disk']['data'])}, weights "
                        f"{_fmt_b(r['disk']['weights'])}, workdir {_fmt_b(r['disk']['workdir'])}"),
      ('input: host cores one accelerator needs', '; '.join(
          f"{k}: {v['host_cores_to_feed']:.1f}" for k, v in r['projection']['targets'].items()
          if 'host_cores_to_feed' in v)),
      ('input: 16 host cores feed', f"{16 * r['input']['images_per_cpu_s']:.0f} img/s "
                                    f"(target {TARGET_FEED_IMAGES_PER_S:.0f})"),
  ]
  width = max(len(a) for a, _ in rows)
  print()
  for a, b in rows:
    print(f'  {a:<{width}}  {b}')
  p = r['projection']
  print(f"\n  full recipe: {p['train_images']:,} train images, {p['eval_images']:,} eval "
        f"forwards ({p['eval_images_fepm']:,} of them the FEPM evaluators), "
        f"{p['checkpoint_saves']} checkpoint saves")
  print(f"  {'target':<40} {'train':>9} {'eval':>9} {'fixed':>9} {'total':>9} {'img/s':>9}")
  for k, v in p['targets'].items():
    print(f"  {k:<40} {_fmt_s(v['train_s']):>9} {_fmt_s(v['eval_s']):>9} "
          f"{_fmt_s(v['fixed_s']):>9} {_fmt_s(v['total_s']):>9} {v['images_per_s']:>9.1f}")
  print('\n  assumptions: ' + '\n    '.join(r['assumptions']))
  print('  targets: ' + '; '.join(f'{k} {"met" if v else "NOT met"}'
                                  for k, v in r['targets_met'].items()))


# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--preset', default='occluded_duke', choices=sorted(PRESETS))
  for f in dataclasses.fields(Counts):
    p.add_argument('--' + f.name.replace('_', '-'), type=int, default=None,
                   help='overrides the preset')
  p.add_argument('--height', type=int, default=256)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--config', default='configs/occluded_duke.py')
  p.add_argument('--steps', type=int, default=4, help='train steps of the run (both parts)')
  p.add_argument('--kill-after', type=int, default=1, help='SIGTERM once this step is logged')
  p.add_argument('--batch', default='2x4',
                 help='P x K of the rehearsal run (recipe: 16x4; 2x4 fits a 24 GB machine)')
  p.add_argument('--eval-query', type=int, default=128)
  p.add_argument('--eval-gallery', type=int, default=128)
  p.add_argument('--input-batches', type=int, default=12)
  p.add_argument('--flops-batch', type=int, default=0,
                 help="batch of the FLOP count's compile (0 = the recipe's; tests use less)")
  p.add_argument('--model-size', default='', help="e.g. 'tiny' (tests); '' = the config's")
  p.add_argument('--weights-size', default='', help="ViT of the timm file ('' = the model's)")
  p.add_argument('--workers', type=int, default=0, help='data drawing processes (0 = CPUs)')
  p.add_argument('--cache-dir', default='', help="'' = $OGFR_JAX_CACHE/rehearsal")
  p.add_argument('--workdir', default='', help="'' = a fresh folder under the cache dir")
  p.add_argument('--stall-s', type=float, default=1800, help='a run silent this long fails')
  p.add_argument('--json', default='', help='write the report here')
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  counts = dataclasses.replace(PRESETS[args.preset], **{
      f.name: getattr(args, f.name) for f in dataclasses.fields(Counts)
      if getattr(args, f.name) is not None})
  if args.kill_after >= args.steps:
    raise SystemExit('--kill-after must be below --steps: the resumed run needs a step to do')
  cache = args.cache_dir or os.path.join(os.path.dirname(synthetic.default_cache_dir()),
                                         'rehearsal')
  workdir = args.workdir or tempfile.mkdtemp(prefix='run-', dir=_mkdir(cache))
  r: dict = {'preset': args.preset, 'counts': dataclasses.asdict(counts), 'height': args.height,
             'width': args.width, 'cpus': cpus(), 'load_average_1min': os.getloadavg()[0]}
  t_all = time.perf_counter()

  root, gen_s = ensure_dataset(counts, args.seed, args.height, args.width, cache,
                               args.workers or cpus())
  r['data'] = {'root': root, 'generate_s': gen_s}
  log(f'data: {root} ({"cached" if gen_s is None else _fmt_s(gen_s)})')

  config_path = os.path.join(ROOT, args.config) if not os.path.isabs(args.config) else args.config
  base = load_config(config_path, {'dataset.root': root})
  size = args.weights_size or args.model_size or base.model.size
  weights = os.path.join(cache, f'vit_{size}_patch16_224.random.safetensors')
  t0 = time.perf_counter()
  wbytes = write_timm_vit(weights, size, args.seed) if not os.path.isfile(weights) else (
      os.path.getsize(weights))
  r['weights'] = {'path': weights, 'bytes': wbytes, 'write_s': time.perf_counter() - t0}
  log(f'weights: {weights}')

  recipe = load_config(config_path, {'dataset.root': root})
  scan = measure_scan(recipe)
  train_split = scan.pop('data')
  r['scan'] = scan
  log(f"scan: {_fmt_s(scan['scan_s'])}; sampler epoch {_fmt_s(scan['sampler_epoch_s'])}")
  r['input'] = measure_input(recipe, train_split.train, args.input_batches)
  log(f"input: {r['input']['images_per_cpu_s']:.0f} images per CPU-second")
  recipe_facts = {
      'epochs': int(recipe.train.epochs), 'batch': recipe.input.ids_per_batch
      * recipe.input.images_per_id, 'steps_per_epoch': scan['sampler_steps_per_epoch'],
      'periodic_evals': len(range(int(recipe.train.eval_every_epochs), int(recipe.train.epochs),
                                  int(recipe.train.eval_every_epochs)))
      if recipe.train.eval_every_epochs else 0,
      'checkpoint_every': int(recipe.train.checkpoint_every),
      'fepm_evaluators': [n for n in recipe.eval.evaluators if n != 'student_ranking']
                         if build.has_fepm(recipe) else [],
      'train': len(train_split.train), 'query': len(train_split.query),
      'gallery': len(train_split.gallery)}

  view = os.path.join(workdir, 'data', LAYOUT_DIR)
  n_q, n_g = make_view(root, view, args.eval_query, args.eval_gallery)
  overrides = run_overrides(args, view, weights)
  run_dir = os.path.join(workdir, 'run')
  cmd = main_command(config_path, run_dir, overrides)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  r['command'] = ' '.join(cmd[1:])
  log('run 1: ' + ' '.join(cmd[1:]))
  run1 = run_main(cmd, run_dir, os.path.join(workdir, 'run1.log'), kill_after=args.kill_after,
                  stall_s=args.stall_s, env=env)
  if run1['rc'] != 143:
    raise RuntimeError(f"run 1 ended with status {run1['rc']}, not 143 (stopped by SIGTERM; "
                       f"0: it finished before the stop landed, raise --steps); see "
                       f"{workdir}/run1.log")
  saved = sorted(int(d) for d in os.listdir(os.path.join(run_dir, 'checkpoints')) if d.isdigit())
  if not saved or saved[-1] >= args.steps:
    raise RuntimeError(f'run 1 left checkpoints {saved} of {args.steps} steps: the stop came too '
                       'late to leave a step for the resumed run; raise --steps')
  log(f"run 1: stopped with status 143 after {_fmt_s(run1['wall_s'])}, checkpoint {saved}")
  run2 = run_main(cmd, run_dir, os.path.join(workdir, 'run2.log'), kill_after=None,
                  stall_s=args.stall_s, env=env)
  if run2['rc'] != 0:
    raise RuntimeError(f"run 2 ended with status {run2['rc']}; see {workdir}/run2.log")
  with open(os.path.join(run_dir, 'results.json')) as f:
    results = json.load(f)
  log(f"run 2: resumed from step {saved[-1]}, finished in {_fmt_s(run2['wall_s'])}")

  p, k = (int(v) for v in args.batch.split('x'))
  t1 = step_times(run1, p * k, 1)
  t2 = step_times(run2, p * k, saved[-1] + 1)
  steady = t1['steps'] + t2['steps']
  step_s = float(np.median(steady)) if steady else None
  last_row = run2['seen'][max(run2['seen'])]
  final_ckpt = os.path.join(run_dir, 'checkpoints', str(args.steps))
  eval_start = max(last_row, os.stat(final_ckpt).st_ctime) if os.path.isdir(final_ckpt) else (
      last_row)
  eval_wall = os.stat(os.path.join(run_dir, 'results.json')).st_mtime - eval_start
  eval_batch = int(recipe.input.eval_batch_size)
  padded = -(-n_q // eval_batch) * eval_batch + -(-n_g // eval_batch) * eval_batch
  r['train'] = {
      'batch': p * k, 'steps': args.steps, 'killed_after_step': args.kill_after,
      'checkpoint_steps_after_kill': saved, 'step_times_s': steady, 'step_s': step_s,
      'images_per_s': p * k / step_s if step_s else None,
      'run1_first_step_s': t1['first_step_s'], 'run2_first_step_s': t2['first_step_s'],
      'run1_wall_s': run1['wall_s'], 'run2_wall_s': run2['wall_s'],
      'run1_peak_rss_bytes': run1['peak_rss_bytes'], 'run2_peak_rss_bytes': run2['peak_rss_bytes']}
  r['eval'] = {'query': n_q, 'gallery': n_g, 'batch': eval_batch, 'wall_s': eval_wall,
               's_per_image': eval_wall / padded, 'padded_images': padded,
               'mAP': results.get(recipe.dataset.name, {}).get('mAP')}
  log(f"train step {_fmt_s(step_s)} at batch {p * k}; final eval {_fmt_s(eval_wall)}")

  run_config = load_config(config_path, overrides)
  ck = measure_checkpoint(run_config, run_dir, os.path.join(workdir, 'scratch_ckpt'))
  log(f"checkpoint: save {_fmt_s(ck['save_s'])}, restore {_fmt_s(ck['restore_s'])}, "
       f"checksum {_fmt_s(ck['checksum_s'])}")
  model, state, mesh = ck.pop('model'), ck.pop('state'), ck.pop('mesh')
  num_classes, _ = ck.pop('num_classes'), ck.pop('num_cameras')
  r['checkpoint'] = ck
  recipe_run = load_config(config_path, dict(overrides, **{
      'input.ids_per_batch': recipe.input.ids_per_batch,
      'input.images_per_id': recipe.input.images_per_id}))
  r['flops'] = measure_flops(recipe_run, model, state, mesh, num_classes,
                             args.flops_batch or recipe_facts['batch'])
  del model, state
  log(f"flops: {r['flops']['flops_per_train_image'] / 1e9:.1f} GFLOP per train image")

  dim = {'tiny': 64, 'mini': 128, 'small': 384, 'base': 768, 'large': 1024}.get(
      run_config.model.size, 768)
  r['ranking'] = measure_ranking(counts, dim)
  log(f"ranking: {_fmt_s(r['ranking']['eval_s'])}")

  self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  peaks = {'rehearsal process (data, scan, input, checkpoint, FLOPs)': self_peak,
           'run 1 (main)': run1['peak_rss_bytes'] or 0,
           'run 2 (main, resumed + eval)': run2['peak_rss_bytes'] or 0,
           'ranking worker': r['ranking']['peak_rss_mb'] * 2**20}
  r['peak_rss_by_process'] = peaks
  r['peak_rss_process'] = max(peaks, key=peaks.get)
  r['peak_rss_bytes'] = max(peaks.values())
  r['disk'] = {'data': _du(os.path.dirname(root)), 'weights': wbytes,
               'workdir': _du(run_dir)}
  r['projection'] = projection(r, recipe_facts, args)
  r['recipe'] = recipe_facts
  r['targets_met'] = {
      'peak RSS < 16 GB': r['peak_rss_bytes'] < TARGET_RSS_BYTES,
      'ranking < 2 GB': r['ranking']['peak_rss_mb'] * 2**20 < TARGET_RANKING_BYTES,
      f'{TARGET_HOST_CORES} cores feed {TARGET_FEED_IMAGES_PER_S:.0f} img/s':
          TARGET_HOST_CORES * r['input']['images_per_cpu_s'] >= TARGET_FEED_IMAGES_PER_S}
  r['assumptions'] = [
      'train time scales with images at the measured per-image cost (this CPU: the step at '
      f"batch {p * k}; accelerators: XLA FLOPs of the step at the recipe's batch "
      f"{recipe_facts['batch']} over peak x MFU)",
      'XLA:CPU float32 FLOP counts stand for the bf16 step (casts add a few percent)',
      'evaluation forwards cost the student extraction\'s FLOPs each (the FEPM evaluators\' '
      'teacher passes included) at the same MFU',
      'fixed costs as on this machine: the scan and, per checkpoint, the part of a save the '
      'train loop waits for (checksums, copy to the host; the write itself runs behind the '
      'next steps); '
      'compilation, start-up and input stalls left out of the accelerator rows',
      'input pipeline: one host core builds images at the measured images per CPU-second; '
      'decoding the real JPEGs costs like these synthetic ones of the same size',
      f"this machine: {r['cpus']} CPU(s) available to the rehearsal, load average "
      f"{r['load_average_1min']:.1f} at the start"]
  r['total_s'] = time.perf_counter() - t_all
  print_report(r)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(r, f, indent=1, default=str)
  return r


def _mkdir(path: str) -> str:
  os.makedirs(path, exist_ok=True)
  return path


if __name__ == '__main__':
  main()
