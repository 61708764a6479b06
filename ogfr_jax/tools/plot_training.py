r"""Training curves of a run as PNG: the purification agent, the losses, and evaluations.

  python -m ogfr_jax.tools.plot_training --workdir runs/synthetic [--out FILE.png]

Reads WORKDIR/metrics.jsonl, which the trainer writes next to its TensorBoard events with the
same scalars (one JSON object per logging step: 'step' and 'train/...', or 'eval/<dataset>/...'
after an evaluation), so no TensorBoard installation is needed. A resumed run may log a step
twice; the later line wins. Panels without data in the log are left out:
  agent selection rate (sampled and greedy) | agent reward (sampled, greedy, baseline)
  loss terms (log scale)                    | evaluation rank-1 / mAP / mINP
Needs matplotlib (the 'dev' extra), drawn off-screen (Agg). Default output:
WORKDIR/training.png.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import numpy as np

from ogfr_jax import paths
from ogfr_jax.tools import cli
from ogfr_jax.tools import common

# (panel title, y label, [(metric key, legend label)], log scale)
PANELS = (
    ('purification agent: selection rate', 'fraction of tokens',
     [('train/agent/select_rate', 'sampled (training policy)'),
      ('train/agent/greedy_select_rate', 'greedy')], False),
    ('purification agent: reward', 'reward',
     [('train/agent/reward', 'sampled'), ('train/agent/greedy_reward', 'greedy'),
      ('train/agent/logprob_gain', 'log-prob gain (sampled)'),
      ('train/agent/baseline', 'moving-average baseline')], False),
    ('losses', 'loss',
     [('train/loss/total', 'total'), ('train/loss/teacher_id', 'teacher ID'),
      ('train/loss/student_id', 'student ID'), ('train/loss/teacher_triplet', 'teacher triplet'),
      ('train/loss/student_triplet', 'student triplet'), ('train/loss/kd_feature', 'KD feature'),
      ('train/loss/kd_logit', 'KD logit'), ('train/loss/pattern', 'pattern CE')], True),
)
EVAL_METRICS = ('rank1', 'mAP', 'mINP')


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one scalar, sorted by step, the last logged value per step kept."""
  by_step: dict[int, float] = {}
  for row in rows:
    if key in row and 'step' in row:
      value = row[key]  # null: a non-finite value (writers.encode_row)
      by_step[int(row['step'])] = np.nan if value is None else float(value)
  steps = np.array(sorted(by_step), np.int64)
  return steps, np.array([by_step[s] for s in steps], np.float64)


def eval_keys(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
  """[(key, label)] of the evaluation scalars in the log, e.g. eval/synthetic/rank1."""
  keys = sorted({k for row in rows for k in row if k.startswith('eval/')
                 and k.rsplit('/', 1)[-1] in EVAL_METRICS})
  return [(k, k[len('eval/'):]) for k in keys]


def plot(rows: Sequence[dict[str, Any]], path: str, title: str = '',
         skip: Sequence[str] = ()) -> list[str]:
  """Draws the panels that have data (leaving out the `skip` keys); returns their titles."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [(name, ylabel, [(k, l) for k, l in keys if k not in skip], log)
            for name, ylabel, keys, log in PANELS]
  panels = [p for p in panels if any(series(rows, k)[0].size for k, _ in p[2])]
  evals = eval_keys(rows)
  if evals:
    panels.append(('evaluation', 'fraction', evals, False))
  if not panels:
    raise ValueError('the metrics log holds none of the plotted scalars '
                     f'({", ".join(k for p in PANELS for k, _ in p[2])}, eval/...)')
  cols = 2 if len(panels) > 1 else 1
  nrows = -(-len(panels) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(6.0 * cols, 3.4 * nrows), squeeze=False)
  for ax, (name, ylabel, keys, log) in zip(axes.flat, panels):
    for key, label in keys:
      steps, values = series(rows, key)
      if steps.size == 0:
        continue
      marker = 'o' if steps.size < 20 else None
      ax.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.2)
    if log and all(np.all(series(rows, k)[1] > 0) for k, _ in keys if series(rows, k)[0].size):
      ax.set_yscale('log')
    ax.set_title(name, fontsize=10)
    ax.set_xlabel('step', fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc='best')
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=90)
  plt.close(fig)
  common.write_file(path, buffer.getvalue())
  return [p[0] for p in panels]


def parse_args(argv: Sequence[str]):
  p = common.ArgumentParser(prog='python -m ogfr_jax.tools.plot_training',
                            description=__doc__.split('\n\n')[0])
  p.add('workdir', required=True, help='training workdir (holds metrics.jsonl)')
  p.add('out', default='', help='PNG file (default WORKDIR/training.png)')
  return p.parse_args(list(argv))


def main(argv: Sequence[str]) -> str:
  args = parse_args(argv)
  workdir = paths.resolve(args.workdir, '--workdir')
  rows = common.read_jsonl(paths.join(workdir, 'metrics.jsonl'))
  out = args.out or paths.join(workdir, 'training.png')
  name = os.path.basename(workdir.rstrip('/'))
  last = max((int(r['step']) for r in rows if 'step' in r), default=0)
  skip = []
  if paths.exists(paths.join(workdir, 'config.json')):
    if common.workdir_config(args.workdir).fepm.baseline != 'moving_average':
      # The logged moving average is carried unchanged (zero) under the self-critical baseline.
      skip.append('train/agent/baseline')
  panels = plot(rows, out, title=f'{name}: {last} steps', skip=skip)
  print(f'wrote {out} ({", ".join(panels)})')
  return out


if __name__ == '__main__':
  cli.run_cli(main)
