"""What a run writes as it goes: TensorBoard events and metrics.jsonl (process 0 only),
the host summary of a logging window, and the small formatting helpers of the progress line.

TensorBoard holds, besides the train scalars: the resolved config as text (`config`), each
evaluation's metrics (`eval/<dataset>/...`) and a ranked-list thumbnail
(`eval/<dataset>/ranked_lists`: a few queries with their top gallery images), and at the
final evaluation the FEPM report of results.json as scalars (`eval/fepm/...`: selection
precision, recall, rate and the random-pick precision per split; teacher mAP and rank-1
purified vs clean and the token-ranking probe when those evaluators run).

A resumed run first drops what an interrupted run logged after the checkpoint it resumes
from (`truncate_metrics`, TensorBoard purge_step), so every step appears once.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import logging

from ogfr_jax import paths


def encode_row(row: dict) -> str:
  """One metrics.jsonl line: strict JSON, with a non-finite value (NaN, +-inf) written as
  null (Python's json would write the bare NaN / Infinity that strict parsers refuse)."""
  clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
           for k, v in row.items()}
  return json.dumps(clean, allow_nan=False) + '\n'


def _read_jsonl(path: str) -> tuple[list[dict], int]:
  """(rows, number of unreadable lines) of a metrics.jsonl; a kill can cut the last line.

  null stands for a non-finite value (`encode_row`); files of older versions hold bare NaN,
  which is read as well.
  """
  rows, broken = [], 0
  with paths.open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        broken += 1
  return rows, broken


def truncate_metrics(path: str, resume_step: int, *, redo_eval: bool = False) -> int:
  """Drops the lines of metrics.jsonl logged after `resume_step`; returns how many went.

  A run killed after its last checkpoint logged steps that the resumed run computes (and logs)
  again; without this the file would hold two values for those steps. Lines cut short by the
  kill go too, and with `redo_eval` the evaluation logged at `resume_step` itself (the final
  one, which follows the last checkpoint and runs again). The file is replaced atomically.
  """
  rows, broken = _read_jsonl(path)

  def kept(row: dict) -> bool:
    step = int(row.get('step', 0))
    if redo_eval and step == resume_step and any(k.startswith('eval/') for k in row):
      return False
    return step <= resume_step

  keep = [r for r in rows if kept(r)]
  dropped = len(rows) - len(keep) + broken
  if dropped:
    paths.write_text(path, ''.join(encode_row(r) for r in keep))
  return dropped


class Writer:
  """TensorBoard events (tensorboardX) and a metrics.jsonl, written by process 0 only.

  `resume_step`: the step the run continues from. Anything logged after it by an earlier,
  interrupted run is dropped from metrics.jsonl and hidden in TensorBoard (purge_step), since
  those steps are about to be logged again; `redo_eval`: so is an evaluation at resume_step.
  """

  def __init__(self, workdir: str, resume_step: int = 0, *, redo_eval: bool = False,
               config=None):
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      workdir = paths.resolve(workdir, '--workdir')
      path = paths.join(workdir, 'metrics.jsonl')
      if paths.exists(path):
        dropped = truncate_metrics(path, resume_step, redo_eval=redo_eval)
        if dropped:
          logging.info('%s: dropped %d lines logged after step %d by an interrupted run; those '
                       'steps are run and logged again', path, dropped, resume_step)
      tb_dir = paths.join(workdir, 'tensorboard')
      purge_step = resume_step + 1 if paths.isdir(tb_dir) else None
      paths.register_tensorboard()  # event files of a gs:// (...) workdir go through epath
      self._tb = SummaryWriter(logdir=tb_dir, purge_step=purge_step)
      self._jsonl = paths.AppendFile(path)
      if config is not None:
        self.text('config', config_text(config), resume_step)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self._active:
      return
    for k, v in values.items():
      self._tb.add_scalar(k, float(v), step)
    self._jsonl.write(encode_row({'step': step, **{k: float(v) for k, v in values.items()}}))
    self._jsonl.flush()
    self._tb.flush()

  def text(self, tag: str, text: str, step: int) -> None:
    """A text panel in TensorBoard (markdown)."""
    if self._active:
      self._tb.add_text(tag, text, step)
      self._tb.flush()

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    """A uint8 [H, W, 3] image in TensorBoard."""
    if self._active and image is not None:
      self._tb.add_image(tag, np.asarray(image, np.uint8), step, dataformats='HWC')
      self._tb.flush()

  def close(self) -> None:
    if self._active and self._jsonl is not None:
      self._tb.close()
      self._jsonl.close()
      self._jsonl = None


def summarize(history: list[dict]) -> dict[str, float]:
  """Host summary of a logging window of per-step metrics.

  Means over the window, leaving out steps whose update was skipped as non-finite (their loss
  is NaN and says nothing about the others); 'guard/nonfinite_steps' counts those steps and
  'guard/nonfinite_total' is the run's count so far.
  """
  host = jax.device_get(history)
  bad = np.array([float(h.get('guard/nonfinite', 0.0)) > 0 for h in host])
  use = ~bad if (~bad).any() else np.ones_like(bad)
  out = {}
  for key in host[0]:
    values = np.array([float(h[key]) for h in host], np.float64)
    if key == 'guard/nonfinite':
      out['guard/nonfinite_steps'] = float(values.sum())
    elif key == 'guard/nonfinite_total':
      out[key] = float(values[-1])
    else:
      out[key] = float(np.mean(values[use]))
  return out


def config_text(config) -> str:
  """The resolved config as a markdown code block (TensorBoard's text panel)."""
  try:
    body = config.to_json_best_effort(indent=2, sort_keys=True)
  except AttributeError:
    body = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
  # Four-space indentation makes a code block in TensorBoard's markdown.
  return '\n'.join('    ' + line for line in body.splitlines())


def fepm_scalars(report: dict) -> dict[str, float]:
  """results.json's `fepm` object as TensorBoard scalars: eval/fepm/<split>/<figure> of the
  selection against the planted contamination (precision, recall, select_rate, and chance:
  the precision of a random pick), eval/fepm/teacher_<purified|clean>/<mAP|rank1>,
  eval/fepm/token_ranking/<precision|chance|x_chance>: whichever evaluators ran. Figures
  that are None (nothing planted, or left out) are left out."""
  out = {}
  for split in ('gallery', 'train'):
    counts = report.get(split)
    if isinstance(counts, dict):
      for key in ('precision', 'recall', 'select_rate', 'chance'):
        if isinstance(counts.get(key), (int, float)):
          out[f'eval/fepm/{split}/{key}'] = float(counts[key])
  for branch, keys in (('teacher_purified', ('mAP', 'rank1')),
                       ('teacher_clean', ('mAP', 'rank1')),
                       ('token_ranking', ('precision', 'chance', 'x_chance'))):
    figures = report.get(branch)
    if isinstance(figures, dict):
      for key in keys:
        if isinstance(figures.get(key), (int, float)):
          out[f'eval/fepm/{branch}/{key}'] = float(figures[key])
  return out


def drop_redundant(summary: dict[str, float], config) -> dict[str, float]:
  """The summary without figures that repeat another one: under fepm.baseline=
  'leave_one_out' the mean of the baselines is the mean reward (each sample's baseline is
  the mean of the others), so agent/baseline would draw agent/reward again."""
  if config.fepm.get('baseline') == 'leave_one_out':
    return {k: v for k, v in summary.items() if k != 'agent/baseline'}
  return summary


def ranked_thumbnail(qf, gf, query, gallery, *, num_queries: int = 4, topk: int = 5,
                     height: int = 64) -> np.ndarray:
  """uint8 [H, W, 3]: `num_queries` queries spread over the query set, each beside its `topk`
  gallery images under the evaluation's protocol (same identity and camera left out); green
  frame: the same identity, red: another. qf, gf: features (device or host arrays) in split
  order. Every process must call it (the distances are computed on the devices)."""
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import image_io  # pylint: disable=g-import-not-at-top
  from ogfr_jax.tools import drawing  # pylint: disable=g-import-not-at-top
  n = len(query)
  idx = np.unique(np.linspace(0, n - 1, min(num_queries, n)).round().astype(int))
  dist = np.asarray(parallel.fetch(_query_distances(qf, gf, jax.numpy.asarray(idx))))
  if jax.process_index() != 0:
    return None
  q_pids, q_cams = np.asarray(query.pids), np.asarray(query.camids)
  g_pids, g_cams = np.asarray(gallery.pids), np.asarray(gallery.camids)
  rows = []
  for row, i in enumerate(idx):
    keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
    order = [j for j in np.argsort(dist[row], kind='stable') if keep[j]][:topk]
    tile = lambda path: drawing.fit_height(image_io.load_image(path), height)  # noqa: E731
    tiles = [drawing.bordered(tile(query.paths[i]), drawing.BLUE)]
    tiles += [drawing.bordered(tile(gallery.paths[j]),
                               drawing.GREEN if g_pids[j] == q_pids[i] else drawing.RED)
              for j in order]
    rows.append(drawing.hstack(tiles))
  return drawing.vstack(rows)


@jax.jit
def _query_distances(qf, gf, idx):
  from ogfr_jax import metrics  # pylint: disable=g-import-not-at-top
  return metrics.pairwise_distance_device(qf[idx], gf)


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def global_sum(local: int) -> int:
  """Sum of a host integer over processes (collective when there are several)."""
  if jax.process_count() == 1:
    return int(local)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.int32(local))))
