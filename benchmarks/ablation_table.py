"""The ablation ladder over seeds, on the embedded benchmark or a dataset: one table of mean
and spread.

  python benchmarks/ablation_table.py --root runs/ablations --seeds 0 1 2 [--jobs 2] [--json]
  python benchmarks/ablation_table.py --root runs/abl_oduke --dataset occluded_duke \
      -- --config.dataset.root=/data/Occluded_Duke --config.init_from=vit_base.npz

The table (mean and sample standard deviation over seeds, the values of each seed) is printed
and written to ROOT/table.json and, in the README's form, ROOT/table.md.

Every step of configs/ablations.py runs through the normal entry point
(`python -m ogfr_jax.main --config configs/ablations.py:step=S --config.seed=N`) with the same
budget, so each row differs from the one above it by one component. --dataset NAME runs the
ladder on the recipe of configs/NAME.py (`dataset=NAME` in the config arg; --config-args adds
more, e.g. `runlocal`). Row `random_init` evaluates the full model (--random-init-step) of the
same config at random initialisation (no training; `--config.init_from=` overrides are left
out there, and row `init_only` evaluates that initialisation). Runs that already have a
results.json are reused, so an interrupted table continues where it stopped. --jobs N runs
N at a time, each pinned to a CPU of its own. Extra
`--config.FIELD=VALUE` arguments after `--` go to every run.

--pretrain first trains configs/synthetic_source.py (a disjoint synthetic world; the stand-in
for ImageNet pretraining), exports its student, and starts every trained row from it; the
extra row `source_only` evaluates that initialisation without any training on the benchmark,
while `random_init` stays a truly random initialisation.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import queue
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import ablations  # noqa: E402  pylint: disable=g-import-not-at-top

METRICS = ('mAP', 'rank1', 'rank5', 'mINP')
# From results.json's `fepm` object, for rows with a purification module.
FEPM_METRICS = ('teacher_mAP', 'teacher_clean_mAP', 'gallery_precision', 'gallery_recall',
                'gallery_chance')


def config_spec(step: str, config: str = 'configs/ablations.py', arg: str = 'step',
                dataset: str = '', config_args: str = '') -> str:
  """The --config value of one row: FILE:ARG=STEP[,dataset=NAME][,MORE]."""
  parts = [f'{arg}={step}'] + ([f'dataset={dataset}'] if dataset else []) + (
      [config_args] if config_args else [])
  return f'{config}:{",".join(parts)}'


def test_metrics(results: dict) -> dict:
  """The metrics of the evaluated dataset in a results.json (keyed by its name)."""
  names = [k for k in results if k not in ('manifest', 'fepm')]
  if len(names) != 1:
    raise ValueError(f'expected the results of one test dataset, found {names}')
  return dict(results[names[0]])


def step_command(root: str, step: str, seed: int, extra: list[str],
                 config: str = 'configs/ablations.py', arg: str = 'step', dataset: str = '',
                 config_args: str = '') -> tuple[list[str], str] | None:
  """The (command, log path) of one row and seed, or None when its results.json exists."""
  workdir = os.path.join(root, f'{step}_seed{seed}')
  if os.path.exists(os.path.join(workdir, 'results.json')):
    return None
  cmd = [sys.executable, '-m', 'ogfr_jax.main', '--config',
         config_spec(step, config, arg, dataset, config_args), '--workdir', workdir,
         f'--config.seed={seed}', *extra]
  return cmd, os.path.join(root, f'{step}_seed{seed}.log')


def _pin(cpu: int | None):
  """A child's preexec_fn that pins it to `cpu` (None: no pinning)."""
  return None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))


def _run(cmd: list[str], log_path: str, cpu: int | None) -> None:
  print('+', ' '.join(cmd) + ('' if cpu is None else f'  (CPU {cpu})'), flush=True)
  with open(log_path, 'w') as log:
    rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                        preexec_fn=_pin(cpu)).returncode
  if rc:
    raise RuntimeError(f'exit {rc} from: {" ".join(cmd)}; its output is in {log_path}')


def run_pinned(commands: list[tuple[list[str], str]], jobs: int = 1) -> None:
  """Runs each (command, log path). jobs 1: one after another, on every CPU this process may
  use. jobs N > 1: N at a time, each pinned to a CPU of its own, so each run computes on one
  XLA:CPU thread (the layout of the tables in docs/results.md: their figures repeat to the
  last digit only on the same thread count)."""
  if jobs <= 1:
    for cmd, log_path in commands:
      _run(cmd, log_path, None)
    return
  cpus = sorted(os.sched_getaffinity(0))
  if jobs > len(cpus):
    raise ValueError(f'--jobs {jobs}: this process may use {len(cpus)} CPUs {cpus}')
  free: queue.Queue = queue.Queue()
  for cpu in cpus[:jobs]:
    free.put(cpu)

  def one(item):
    cpu = free.get()
    try:
      _run(*item, cpu)
    finally:
      free.put(cpu)

  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    for future in [pool.submit(one, item) for item in commands]:
      future.result()


def read_row(root: str, step: str, seed: int) -> dict:
  with open(os.path.join(root, f'{step}_seed{seed}', 'results.json')) as f:
    results = json.load(f)
  row = test_metrics(results)
  fepm = results.get('fepm')
  if fepm:  # what the purification did (evaluator.fepm_report)
    row.update({'teacher_mAP': fepm['teacher_purified']['mAP'],
                'teacher_clean_mAP': fepm['teacher_clean']['mAP'],
                'gallery_precision': fepm['gallery']['precision'] or 0.0,
                'gallery_recall': fepm['gallery']['recall'] or 0.0,
                'gallery_chance': fepm['gallery']['chance']})
  return row


def summarize(rows: dict[str, list[dict]]) -> dict:
  """{row: {metric: {mean, std, values}}} over seeds; std is the sample standard deviation
  (ddof 1; 0 for a single seed). A metric no row has is left out; a row without it gets nan."""
  columns = METRICS + tuple(m for m in FEPM_METRICS
                            if any(m in r for results in rows.values() for r in results))
  table = {}
  for name, results in rows.items():
    table[name] = {}
    for m in columns:
      vals = np.array([r.get(m, np.nan) for r in results], np.float64)
      std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
      table[name][m] = {'mean': float(vals.mean()), 'std': std, 'values': vals.tolist()}
  return table


def text_table(table: dict) -> str:
  columns = list(next(iter(table.values()))) if table else []
  lines = [f"{'row':15s} " + ' '.join(f'{m:>22s}' for m in columns)]
  for name, cells in table.items():
    text = ['-' if np.isnan(c['values']).all() else
            f"{c['mean']:.3f}+-{c['std']:.3f} ({min(c['values']):.2f}..{max(c['values']):.2f})"
            for c in cells.values()]
    lines.append(f'{name:15s} ' + ' '.join(f'{t:>22s}' for t in text))
  return '\n'.join(lines)


def markdown(table: dict, metrics: tuple[str, ...] = ('mAP', 'rank1')) -> str:
  """The README form: per metric, mean +- std and the values of each seed."""
  head = ' | '.join(f'{m} mean +- std | {m} per seed' for m in metrics)
  lines = [f'| row | {head} |', '| --- |' + ' --- | --- |' * len(metrics)]
  for name, cells in table.items():
    parts = []
    for m in metrics:
      c = cells[m]
      parts += [f"{c['mean']:.3f} +- {c['std']:.3f}",
                ' / '.join(f'{v:.3f}' for v in c['values'])]
    lines.append(f'| {name} | ' + ' | '.join(parts) + ' |')
  return '\n'.join(lines)


def pretrain(root: str) -> str:
  """Trains the source model once (reused if present) and returns its exported student.
  The table's extra overrides do not apply: the source schedule is part of the protocol."""
  workdir, weights = os.path.join(root, 'source'), os.path.join(root, 'source.safetensors')
  if not os.path.exists(os.path.join(workdir, 'results.json')):
    cmd = [sys.executable, '-m', 'ogfr_jax.main', '--config', 'configs/synthetic_source.py',
           '--workdir', workdir]
    print('+', ' '.join(cmd), flush=True)
    with open(os.path.join(root, 'source.log'), 'w') as log:
      subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
  if not os.path.exists(weights):
    subprocess.run([sys.executable, '-m', 'ogfr_jax.tools.convert', '--export_student', workdir,
                    '--output', weights], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
  return weights


def random_init(root: str, seed: int, extra: list[str], name: str = 'random_init',
                spec: str = 'configs/ablations.py:step=full', cpu: int | None = None) -> dict:
  """Evaluates the untrained model of the config `spec` (same data and evaluation as the
  trained rows), pinned to `cpu` when given."""
  path = os.path.join(root, f'{name}_seed{seed}.json')
  if not os.path.exists(path):
    subprocess.run([sys.executable, os.path.abspath(__file__), '--random-init-child', path,
                    '--random-init-config', spec, '--seeds', str(seed), '--root', root, '--',
                    *extra], cwd=REPO, check=True, preexec_fn=_pin(cpu))
  with open(path) as f:
    return json.load(f)


def _random_init_child(path: str, spec: str, seed: int, extra: list[str]) -> None:
  """In a fresh process: the config exactly as the entry point builds it, then evaluation
  of the freshly initialised state."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from ogfr_jax import evaluator, run_config, train  # pylint: disable=g-import-not-at-top
  argv = ['ablation_table', '--config', spec, f'--config.seed={seed}', *extra]
  sys.argv = argv  # config_flags finds the --config.FIELD overrides in sys.argv
  config_flag = config_flags.DEFINE_config_file('config')
  flags.FLAGS(argv)
  config = config_flag.value
  run_config.validate(config)
  s = train.setup(config, os.path.splitext(path)[0] + '_workdir')
  result = evaluator.run_evaluation(s['model'], s['state'], s['test_data'], config, s['mesh'], 0,
                                None)
  with open(path, 'w') as f:
    json.dump(test_metrics(result), f)


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  extra = argv[argv.index('--') + 1:] if '--' in argv else []
  own = argv[:argv.index('--')] if '--' in argv else argv
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--root', required=True, help='folder for the runs and the table')
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--steps', nargs='+', default=None,
                 help='default: every step of configs/ablations.py; on a real dataset '
                 '(--dataset) without fepm_oracle, which needs planted contamination')
  p.add_argument('--config', default='configs/ablations.py',
                 help='the config file whose rows are the steps')
  p.add_argument('--arg', default='step', help="the config arg naming the row ('row' for "
                 'configs/fepm_rows.py)')
  p.add_argument('--dataset', default='', help='run the ladder on configs/NAME.py\'s recipe '
                 '(dataset=NAME in the config arg); set its root after --')
  p.add_argument('--config-args', default='', help="more config args, e.g. 'runlocal'")
  p.add_argument('--random-init-step', default='full',
                 help='the step whose model the random_init row evaluates untrained')
  p.add_argument('--no-random-init', action='store_true', help='leave out the random_init row')
  p.add_argument('--pretrain', action='store_true',
                 help='start every trained row from a source-pretrained student')
  p.add_argument('--jobs', type=int, default=1,
                 help='runs at a time, each pinned to a CPU of its own (one XLA:CPU thread, '
                 "the layout of docs/results.md's tables); default 1: one after another")
  p.add_argument('--json', action='store_true')
  p.add_argument('--random-init-child', help=argparse.SUPPRESS)
  p.add_argument('--random-init-config', help=argparse.SUPPRESS)
  args = p.parse_args(own)
  if args.steps is None:
    real = args.dataset and not args.dataset.startswith('synthetic')
    args.steps = list(ablations.LADDER if real else ablations.STEPS)
  os.makedirs(args.root, exist_ok=True)
  if args.random_init_child:
    _random_init_child(args.random_init_child, args.random_init_config, args.seeds[0], extra)
    return {}

  spec = functools.partial(config_spec, config=args.config, arg=args.arg, dataset=args.dataset,
                           config_args=args.config_args)
  untrained = spec(args.random_init_step)
  # With --jobs N the evaluations of untrained models run on one thread too, like the rows.
  one_cpu = min(os.sched_getaffinity(0)) if args.jobs > 1 else None
  # random_init is untrained from random weights; with --config.init_from=... among the
  # overrides, init_only evaluates that initialisation untrained.
  own_init = [a for a in extra if a.startswith('--config.init_from=')]
  random_extra = [a for a in extra if a not in own_init]
  rows: dict[str, list[dict]] = {} if args.no_random_init else {
      'random_init': [random_init(args.root, s, random_extra, spec=untrained, cpu=one_cpu)
                      for s in args.seeds]}
  if own_init and not args.no_random_init:
    rows['init_only'] = [random_init(args.root, s, extra, 'init_only', untrained, one_cpu)
                         for s in args.seeds]
  if args.pretrain:
    extra = extra + [f'--config.init_from={pretrain(args.root)}']
    rows['source_only'] = [random_init(args.root, s, extra, 'source_only', untrained, one_cpu)
                           for s in args.seeds]
  pending = [step_command(args.root, step, s, extra, args.config, args.arg, args.dataset,
                          args.config_args) for step in args.steps for s in args.seeds]
  run_pinned([c for c in pending if c], args.jobs)
  for step in args.steps:
    rows[step] = [read_row(args.root, step, s) for s in args.seeds]

  table = summarize(rows)
  print(f'\nOccluded queries vs gallery, {len(args.seeds)} seeds {args.seeds}; '
        'mean +- std (min..max)')
  print(text_table(table))
  readme_table = markdown(table)
  print('\n' + readme_table)
  with open(os.path.join(args.root, 'table.json'), 'w') as f:
    json.dump({'seeds': args.seeds, 'dataset': args.dataset or None, 'extra': extra,
               'table': table}, f, indent=2)
  with open(os.path.join(args.root, 'table.md'), 'w') as f:
    f.write(readme_table + '\n')
  if args.json:
    print(json.dumps(table))
  return table


if __name__ == '__main__':
  main()
