r"""Training curves of a run as PNG: the purification agent, the losses, and evaluations.

  python -m ogfr_jax.tools.plot_training --workdir runs/synthetic [--out FILE.png]

Reads WORKDIR/metrics.jsonl, which the trainer writes next to its TensorBoard events with the
same scalars (one JSON object per logging step: 'step' and 'train/...', or 'eval/<dataset>/...'
after an evaluation), so no TensorBoard installation is needed. A resumed run may log a step
twice; the later line wins. Panels without data in the log are left out:
  agent selection rate (sampled and greedy) | agent reward (sampled, greedy, baseline)
  loss terms (log scale)                    | evaluation rank-1 / mAP / mINP
Every panel spans the run's steps; legends sit beside the panels, not over the curves. Two
curves of one panel that would draw one line (closer than 1% of the panel's range: the
reward is the log-prob gain less fepm.eta x the selection rate) are drawn once, labelled
with both names and their largest distance,
and a promised curve the run did not log is named under the panel with the reason. The log
axis of the losses is scaled to the steps after the first logging window (which holds the
values at initialisation); a first point beyond it is drawn at the edge as a triangle.
Evaluations are points (joined only from three on). Needs matplotlib (the 'dev' extra),
drawn off-screen (Agg). Default output: WORKDIR/training.png.
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
      ('train/agent/greedy_select_rate', 'greedy (evaluation)')], False),
    ('purification agent: reward', 'reward',
     [('train/agent/reward', 'sampled'), ('train/agent/greedy_reward', 'greedy'),
      ('train/agent/logprob_gain', 'log-prob gain'),
      ('train/agent/baseline', 'baseline')], False),
    ('losses (unweighted)', 'loss',
     [('train/loss/total', 'total (weighted sum)'), ('train/loss/teacher_id', 'teacher ID'),
      ('train/loss/student_id', 'student ID'), ('train/loss/teacher_triplet', 'teacher triplet'),
      ('train/loss/student_triplet', 'student triplet'), ('train/loss/kd_feature', 'KD feature'),
      ('train/loss/kd_logit', 'KD logit'), ('train/loss/pattern', 'pattern CE')], True),
)
# Why a run logs no such curve, for the note under its panel ({key: reason}).
ABSENT_REASONS = {
    'train/agent/greedy_reward': 'computed only for fepm.baseline=self_critical',
    'train/agent/baseline': 'not drawn: under leave_one_out its mean is the sampled reward; '
                            'under self_critical it is the greedy reward',
}
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
                 and not k.startswith('eval/fepm/') and k.rsplit('/', 1)[-1] in EVAL_METRICS})
  return [(k, k[len('eval/'):]) for k in keys]


# Two curves closer than this share of their panel's value range draw one line to the eye.
_ONE_LINE = 0.01


def gap(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
        value_range: float) -> float | None:
  """The largest distance of two (steps, values) series when they would draw one line (equal
  steps, closer than _ONE_LINE x `value_range` everywhere), else None."""
  if a[0].size == 0 or not np.array_equal(a[0], b[0]):
    return None
  d = np.abs(a[1] - b[1])
  d = d[np.isfinite(d)]
  worst = float(d.max()) if d.size else 0.0
  return worst if worst <= _ONE_LINE * max(value_range, 1e-12) else None


def panel_curves(rows, keys, log: bool = False) -> tuple[list[tuple[str, str]], list[str]]:
  """([(key, label)] to draw, with a curve that would draw over an earlier one merged into its
  label ('sampled = log-prob gain', or '~ ... (within 3e-03)' when not equal), [keys without
  data])."""
  drawn: list[tuple[str, str]] = []
  absent = []

  def get(key):  # on a log axis, closeness is a ratio
    steps, values = series(rows, key)
    if log:
      with np.errstate(divide='ignore', invalid='ignore'):
        values = np.log10(np.where(values > 0, values, np.nan))
    return steps, values

  values = [get(k)[1] for k, _ in keys]
  finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(0)])
  value_range = float(finite.max() - finite.min()) if finite.size else 0.0
  for key, label in keys:
    s = get(key)
    if s[0].size == 0:
      absent.append(key)
      continue
    for i, (other, other_label) in enumerate(drawn):
      d = gap(get(other), s, value_range)
      if d is not None:
        apart = f'x{10 ** d:.3f}' if log else f'{d:.1e}'
        drawn[i] = (other, f'{other_label} = {label}' if d == 0 else
                    f'{other_label}\n~ {label} (within {apart})')
        break
    else:
      drawn.append((key, label))
  return drawn, absent


def _log_limits(rows, keys) -> tuple[float, float] | None:
  """y limits of a log panel from the steps after each curve's first point (that window
  holds the values at initialisation), or None when nothing is left."""
  later = []
  for key, _ in keys:
    values = series(rows, key)[1]
    values = values[1:] if values.size > 1 else values
    later.extend(v for v in values if np.isfinite(v) and v > 0)
  if not later:
    return None
  return min(later) / 1.6, max(later) * 1.6


def plot(rows: Sequence[dict[str, Any]], path: str, title: str = '',
         skip: Sequence[str] = (), absent_reasons: dict[str, str] | None = None) -> list[str]:
  """Draws the panels that have data (leaving out the `skip` keys, which are named under
  their panel with `absent_reasons`); returns their titles."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  reasons = dict(ABSENT_REASONS, **(absent_reasons or {}))
  panels = []
  for name, ylabel, keys, log in PANELS:
    drawn, absent = panel_curves(rows, [(k, l) for k, l in keys if k not in skip], log)
    absent += [k for k, _ in keys if k in skip]
    if drawn:
      labels = dict(keys)
      notes = [f'{labels[k]}: {reasons.get(k, "not logged by this run")}' for k in absent]
      panels.append((name, ylabel, drawn, log, notes))
  evals = eval_keys(rows)
  if evals:
    panels.append(('evaluation (test set)', 'fraction', evals, False, []))
  if not panels:
    raise ValueError('the metrics log holds none of the plotted scalars '
                     f'({", ".join(k for p in PANELS for k, _ in p[2])}, eval/...)')
  last = max((int(r['step']) for r in rows if 'step' in r), default=1)
  cols = 2 if len(panels) > 1 else 1
  nrows = -(-len(panels) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(7.6 * cols, 3.6 * nrows), squeeze=False)
  for ax, (name, ylabel, keys, log, notes) in zip(axes.flat, panels):
    limits = _log_limits(rows, keys) if log else None
    for key, label in keys:
      steps, values = series(rows, key)
      if name.startswith('evaluation'):
        # A few evaluations are points; a line between two of them would read as a trend.
        style = '-' if steps.size >= 3 else 'none'
        ax.plot(steps, values, label=label, marker='o', markersize=5, linestyle=style,
                linewidth=1.0)
        continue
      marker = 'o' if steps.size < 20 else None
      line, = ax.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.2)
      if limits is not None and values.size and not limits[0] <= values[0] <= limits[1]:
        edge, shape = (limits[0], 'v') if values[0] < limits[0] else (limits[1], '^')
        ax.plot([steps[0]], [edge * (1.05 if shape == 'v' else 0.95)], marker=shape,
                color=line.get_color(), markersize=6, linestyle='none')
    if log and limits is not None:
      ax.set_yscale('log')
      ax.set_ylim(*limits)
    ax.set_xlim(0, last * 1.02)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel('step', fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              frameon=False)
    if notes:
      ax.text(0.0, -0.3, '\n'.join(notes), transform=ax.transAxes, fontsize=7, va='top',
              color='0.35')
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
      # Under leave_one_out the baseline's mean is the sampled reward, under self_critical
      # the greedy reward: drawn already (ABSENT_REASONS says so under the panel).
      skip.append('train/agent/baseline')
  panels = plot(rows, out, title=f'{name}: {last} steps', skip=skip)
  print(f'wrote {out} ({", ".join(panels)})')
  return out


if __name__ == '__main__':
  cli.run_cli(main)
