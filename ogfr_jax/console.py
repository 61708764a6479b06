"""What a person sees in the terminal during a run.

A run prints, on process 0 and on stdout:
  - a short header (config, dataset sizes, devices and mesh, workdir, schedule), with room for
    a few extra start-up lines (`header(..., notes=[...])`);
  - one progress display: step, epoch, the loss as the weighted terms that sum to it, the
    learning rate, images/s and ETA. On a
    terminal it is a bar redrawn in place; otherwise (a pipe, a log file) one plain line per
    logging window (config.train.log_every steps);
  - each evaluation as a small table, and at the end the results table and the paths written.

Every metric still goes to TensorBoard and metrics.jsonl (writers.py); the console shows a
few. Library INFO logs (absl, orbax, jax's backend probing) are hidden unless the command
asks for them (`configure_logging`: --verbosity / --log_level of ogfr_jax.main). Warnings
and errors go to stderr from every process; those of processes other than 0 carry
`[process N]`. Processes other than 0 print nothing else.
"""

from __future__ import annotations

import logging as std_logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO

from absl import logging

# --log_level names and the absl verbosity each stands for.
LOG_LEVELS = {'debug': 1, 'info': 0, 'warning': -1, 'error': -2}

# The loss terms of the progress display: label -> the named terms (losses.py) it sums, each
# times its weight. Whatever else the loss holds is shown as `other`, so that the terms on a
# line add up to the loss. Terms a run does not have are left out.
LOSS_GROUPS = (('id', ('student_id',)), ('tri', ('student_triplet',)),
               ('kd', ('kd_feature',)), ('kd-logit', ('kd_logit',)),
               ('teacher', ('teacher_id', 'teacher_triplet')))
# What each label stands for, in the header's legend.
_GROUP_MEANING = {'id': 'student ID', 'tri': 'student triplet', 'kd': 'KD feature',
                  'kd-logit': 'KD logit', 'teacher': 'teacher ID + triplet'}

# Result columns shown in evaluation tables, in this order (others are in results.json).
RESULT_COLUMNS = ('rank1', 'rank5', 'rank10', 'mAP', 'mINP')
# Test sets whose literature reports rank-1 / rank-3: their tables show rank3 too.
RANK3_DATASETS = ('partial_reid', 'partial_ilids')

_state: dict[str, Any] = {'process_index': 0, 'stream': None, 'live': None}


def set_process(index: int) -> None:
  """Which process this is (0 prints the console; the others only warnings and errors)."""
  _state['process_index'] = int(index)


def process_index() -> int:
  return _state['process_index']


def is_primary() -> bool:
  return _state['process_index'] == 0


def stream() -> TextIO:
  return _state['stream'] or sys.stdout


def set_stream(s: Optional[TextIO]) -> None:
  """Where the console writes (None: sys.stdout at the time of each write)."""
  _state['stream'] = s


def is_tty(s: Optional[TextIO] = None) -> bool:
  s = stream() if s is None else s
  try:
    return bool(s.isatty())
  except (AttributeError, ValueError):
    return False


def tag() -> str:
  """'[process N] ' on processes other than 0, '' on process 0."""
  return f'[process {process_index()}] ' if process_index() else ''


# --------------------------------------------------------------------------------------------
# Logging


class _ConsoleFilter(std_logging.Filter):
  """Clears a live progress bar before a log record is printed (so that the record does not
  land in the middle of it), and tags records of processes other than 0."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    live = _state['live']
    if live is not None:
      live.clear()
    if process_index() and not getattr(record, '_ogfr_tagged', False):
      record.msg = f'[process {process_index()}] {record.msg}'
      record._ogfr_tagged = True  # pylint: disable=protected-access
    return True


class _ShortFormatter(std_logging.Formatter):
  """'warning: <message>' (the default console form; absl's prefix of time, thread and
  source line comes back with --verbosity)."""

  def format(self, record: std_logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
      text += '\n' + self.formatException(record.exc_info)
    return f'{record.levelname.lower()}: {text}'


def configure_logging(verbosity: Optional[int] = None) -> None:
  """Library and INFO logs: hidden (warnings and errors only) unless `verbosity` is given.

  verbosity: an absl verbosity (0 = INFO, 1 = DEBUG, -1 = WARNING, -2 = ERROR) the user asked
  for, or None for the default of a run: warnings and errors only, each as one
  'warning: ...' line. absl's level also governs the Python loggers of jax and orbax (absl's
  handler sits on the root logger).
  """
  level = logging.WARNING if verbosity is None else int(verbosity)
  logging.set_verbosity(level)
  # Without absl's handler on the root logger (outside app.run) absl leaves the root alone.
  std_logging.getLogger().setLevel(_std_level(level))
  handler = logging.get_absl_handler()
  handler.setFormatter(_ShortFormatter() if verbosity is None else logging.PythonFormatter())
  if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
    handler.addFilter(_ConsoleFilter())


def _std_level(verbosity: int) -> int:
  """absl verbosity -> Python logging level."""
  if verbosity >= 1:
    return std_logging.DEBUG
  return {0: std_logging.INFO, -1: std_logging.WARNING, -2: std_logging.ERROR}.get(
      verbosity, std_logging.FATAL)


def verbosity_of(log_level: Optional[str]) -> Optional[int]:
  """The absl verbosity of a --log_level name (None stays None)."""
  if log_level is None or log_level == '':
    return None
  try:
    return LOG_LEVELS[log_level.lower()]
  except KeyError:
    raise ValueError(f'--log_level={log_level!r}: use one of {", ".join(LOG_LEVELS)}') from None


# --------------------------------------------------------------------------------------------
# Lines, header, tables


def clear_live() -> None:
  """Takes a live progress bar off the terminal (before an error line)."""
  live = _state['live']
  if live is not None:
    live.clear()


def say(text: str = '') -> None:
  """Prints a line on process 0 (above a live progress bar)."""
  if not is_primary():
    return
  live = _state['live']
  if live is not None:
    live.clear()
  s = stream()
  s.write(text + '\n')
  s.flush()
  if live is not None:
    live.redraw()


def warn(text: str) -> None:
  """A warning for the person at the terminal, from any process (stderr, tagged)."""
  logging.warning('%s', text)


def header(title: str, fields: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> list[str]:
  """The run's header: a title line, `name  value` lines, then `notes` (free start-up lines,
  e.g. a description of the mesh layout), each indented. Returns the lines (printed by
  `say`)."""
  width = max((len(k) for k, _ in fields), default=0)
  lines = [title] + [f'  {k.ljust(width)}  {v}' for k, v in fields]
  lines += [f'  {n}' for n in notes]
  for line in lines:
    say(line)
  return lines


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.4f}'
  return str(value)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = '  ') -> list[str]:
  """Right-aligned columns (floats with 4 decimals) under a header line; the first column is
  left-aligned."""
  cells = [[str(c) for c in columns]] + [[_cell(v) for v in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  out = []
  for r in cells:
    parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
    out.append((indent + '  '.join(parts)).rstrip())
  return out


def results_table(results: Mapping[str, Any]) -> list[str]:
  """The evaluated datasets of `results` ({name: {rank1, ..., step}}) as table lines."""
  columns = RESULT_COLUMNS
  if any(name in RANK3_DATASETS for name in results):
    columns = columns[:1] + ('rank3',) + columns[1:]
  rows = []
  for name, metrics in results.items():
    if not isinstance(metrics, Mapping) or not any(c in metrics for c in RESULT_COLUMNS):
      continue
    rows.append([name] + [metrics.get(c, '-') for c in columns])
  return table(('dataset',) + columns, rows) if rows else []


def print_evaluation(step: int, results: Mapping[str, Any], title: str = 'evaluation') -> None:
  """An evaluation as a small table: a title line with the step, then the table."""
  extra = []
  for metrics in results.values():
    mode = metrics.get('rerank_mode') if isinstance(metrics, Mapping) else None
    if mode not in (None, '', 'none', 'off'):
      extra.append(f're-ranking {metrics["rerank_mode"]}')
  say(f'{title} at step {step}' + (f' ({", ".join(sorted(set(extra)))})' if extra else ''))
  for line in results_table(results):
    say(line)


def fepm_summary(report: Mapping[str, Any]) -> list[str]:
  """A line or two of results.json's `fepm` object (what purification did)."""
  lines = []
  parts = []
  for split in ('gallery', 'train'):
    counts = report.get(split)
    if isinstance(counts, Mapping) and counts.get('precision') is not None:
      parts.append(f'{split} precision {counts["precision"]:.3f} (a random pick: '
                   f'{counts.get("chance", 0.0):.3f}) recall {counts["recall"]:.3f}')
    elif isinstance(counts, Mapping) and 'select_rate' in counts:
      parts.append(f'{split} selection rate {counts["select_rate"]:.3f} (nothing planted to '
                   'score it against)')
  if parts:
    lines.append('  FEPM selection: ' + '; '.join(parts))
  clean, purified = report.get('teacher_clean'), report.get('teacher_purified')
  if isinstance(clean, Mapping) and isinstance(purified, Mapping):
    lines.append(f'  teacher mAP {purified.get("mAP", float("nan")):.4f} purified vs '
                 f'{clean.get("mAP", float("nan")):.4f} clean')
  return lines


def print_final(results: Mapping[str, Any], written: Sequence[tuple[str, str]],
                wall_time_s: Optional[float] = None) -> None:
  """The end of a run: the results table, the FEPM figures, and the paths written."""
  steps = sorted({int(m['step']) for m in results.values()
                  if isinstance(m, Mapping) and 'step' in m})
  say('results' + (f' at step {steps[-1]}' if steps else '') +
      (f' ({format_duration(wall_time_s)} wall time)' if wall_time_s is not None else ''))
  for line in results_table(results):
    say(line)
  if isinstance(results.get('fepm'), Mapping):
    for line in fepm_summary(results['fepm']):
      say(line)
  if written:
    say('wrote')
    width = max(len(k) for k, _ in written)
    for name, path in written:
      say(f'  {name.ljust(width)}  {path}')


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _number(value: float) -> str:
  if value != value:  # NaN
    return 'nan'
  if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
    return f'{value:.1e}'
  return f'{value:.3f}'


def loss_parts(summary: Mapping[str, float], weights: Mapping[str, float]
               ) -> list[tuple[str, float]]:
  """[(label, weighted value)] of a window summary: the LOSS_GROUPS the run has, then
  `other`, the weighted sum of its remaining terms (absent when it has none). With the
  weights of `losses.active_terms(config)` the values sum to loss/total."""
  parts, used = [], set()
  for label, names in LOSS_GROUPS:
    names = [n for n in names if n in weights and f'loss/{n}' in summary]
    if names:
      parts.append((label, sum(weights[n] * float(summary[f'loss/{n}']) for n in names)))
      used.update(names)
  rest = [n for n in weights if n not in used and f'loss/{n}' in summary]
  if rest:
    parts.append(('other', sum(weights[n] * float(summary[f'loss/{n}']) for n in rest)))
  return parts


def loss_legend(weights: Mapping[str, float]) -> str:
  """The header line that says what the progress line's terms are."""
  used, labels, meanings = set(), [], []
  for label, names in LOSS_GROUPS:
    names = [n for n in names if n in weights]
    if names:
      labels.append(label)
      meanings.append(_GROUP_MEANING[label])
      used.update(names)
  rest = [n for n in weights if n not in used]
  if rest:
    labels.append('other')
    meanings.append(' + '.join(rest))
  return (f'progress: loss = {" + ".join(labels)}, each times its config.loss weight '
          f'({", ".join(meanings)})')


def figures_text(summary: Mapping[str, float],
                 weights: Optional[Mapping[str, float]] = None) -> str:
  """'loss 3.214 = id 1.203 + tri 0.310 + kd 0.051 + other 1.650  lr 3.0e-03' from a window
  summary; `weights` ({term: weight}, losses.active_terms) makes the terms weighted, summing
  to the loss. Without weights: the loss and the learning rate."""
  text = f'loss {_number(float(summary.get("loss/total", float("nan"))))}'
  if weights:
    parts = loss_parts(summary, weights)
    if parts:
      text += ' = ' + ' + '.join(f'{label} {_number(v)}' for label, v in parts)
  if 'lr' in summary:
    text += f'  lr {_number(float(summary["lr"]))}'
  return text


# --------------------------------------------------------------------------------------------
# Progress


class _LiveLine:
  """What both progress displays share: a line on a terminal, redrawn in place as a bar."""

  _out: Optional[TextIO] = None
  _width: Optional[int] = None
  _shown = False

  def _stream(self) -> TextIO:
    return self._out or stream()

  def _bar(self, fraction: float, text: str) -> str:
    """'[#####.....]  50%  <text>', cut to the terminal width."""
    width = self._width or shutil.get_terminal_size((100, 24)).columns
    cells = 20
    filled = int(round(fraction * cells))
    line = f'[{"#" * filled}{"." * (cells - filled)}] {fraction * 100:3.0f}%  {text}'
    return line[:max(width - 1, 10)]

  def _show(self, line: str) -> None:
    s = self._stream()
    s.write('\r\x1b[2K' + line)
    s.flush()
    self._shown = True

  def clear(self) -> None:
    """Removes the bar from its line (before other output); `redraw` brings it back."""
    if self._shown:
      s = self._stream()
      s.write('\r\x1b[2K')
      s.flush()
      self._shown = False


class ProgressDisplay(_LiveLine):
  """Step, epoch, loss (and its weighted terms), lr, images/s and ETA of a train loop.

  `advance(done)` is called after every step: on a terminal the bar's counter moves (redrawn
  at most every `min_interval_s`); `report(done, summary, images_per_sec)` after each logging
  window: the figures change (terminal) or one plain line is printed (anything else). Lines
  printed with `say` while the bar is shown appear above it. Only process 0 displays.
  """

  def __init__(self, total_steps: int, steps_per_epoch: int, global_batch: int,
               start_step: int = 0, *, loss_weights: Optional[Mapping[str, float]] = None,
               out: Optional[TextIO] = None,
               tty: Optional[bool] = None, min_interval_s: float = 0.5,
               clock: Callable[[], float] = time.monotonic, width: Optional[int] = None):
    self.total_steps, self.steps_per_epoch = int(total_steps), max(int(steps_per_epoch), 1)
    self.global_batch = int(global_batch)
    self.loss_weights = dict(loss_weights or {})
    self.done = int(start_step)
    self._out = out
    self.tty = is_tty(self._stream()) if tty is None else bool(tty)
    self.enabled = is_primary()
    self.min_interval_s = min_interval_s
    self.clock = clock
    self._width = width
    self._figures = ''
    self._ips: Optional[float] = None
    self._last_draw = -float('inf')
    self._shown = False
    self._closed = False
    if self.enabled and self.tty:
      _state['live'] = self

  def eta_s(self) -> Optional[float]:
    if not self._ips:
      return None
    return (self.total_steps - self.done) * self.global_batch / self._ips

  def text(self) -> str:
    """The progress line (without the terminal bar)."""
    digits = len(str(self.total_steps))
    parts = [f'step {self.done:>{digits}d}/{self.total_steps}',
             f'epoch {self.done / self.steps_per_epoch:.2f}']
    if self._figures:
      parts.append(self._figures)
    if self._ips is not None:
      parts.append(f'{self._ips:.1f} img/s')
    eta = self.eta_s()
    if eta is not None:
      parts.append(f'ETA {format_duration(eta)}')
    return '  '.join(parts)

  def bar_text(self) -> str:
    """'[#####.....]  50%  <progress line>', cut to the terminal width."""
    return self._bar(self.done / self.total_steps if self.total_steps else 1.0, self.text())

  def advance(self, done: int) -> None:
    self.done = int(done)
    if self._closed:
      return
    if self.enabled and self.tty and self.clock() - self._last_draw >= self.min_interval_s:
      self.redraw()

  def report(self, done: int, summary: Mapping[str, float],
             images_per_sec: Optional[float] = None) -> None:
    self.done = int(done)
    self._figures = figures_text(summary, self.loss_weights)
    if images_per_sec is not None and images_per_sec > 0:
      self._ips = float(images_per_sec)
    if not self.enabled or self._closed:
      return
    if self.tty:
      self.redraw()
    else:
      s = self._stream()
      s.write(self.text() + '\n')
      s.flush()

  def redraw(self) -> None:
    if not (self.enabled and self.tty) or self._closed:
      return
    self._draw()

  def _draw(self) -> None:
    self._show(self.bar_text())
    self._last_draw = self.clock()

  def close(self) -> None:
    """Leaves the final state of the bar on its own line and stops being the live bar (once;
    later calls do nothing)."""
    if self._closed:
      return
    self._closed = True
    if _state['live'] is self:
      _state['live'] = None
    if self.enabled and self.tty:
      self._draw()
      s = self._stream()
      s.write('\n')
      s.flush()
      self._shown = False

  def __enter__(self) -> 'ProgressDisplay':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class CountProgress(_LiveLine):
  """Items done of a known total (the images of a feature extraction), with items/s and ETA.

  On a terminal a bar redrawn in place (at most every `min_interval_s`) and taken off the
  terminal by `close`; anything else gets a plain line at most every `line_every_s` seconds,
  and a last line at `close` when it printed any (a short extraction prints nothing). Lines
  printed with `say` meanwhile appear above the bar. Only process 0 displays.
  """

  def __init__(self, total: int, title: str, unit: str = 'images', *,
               out: Optional[TextIO] = None, tty: Optional[bool] = None,
               min_interval_s: float = 0.5, line_every_s: float = 30.0,
               clock: Callable[[], float] = time.monotonic, width: Optional[int] = None):
    self.total, self.title, self.unit = int(total), title, unit
    self.done = 0
    self._out = out
    self.tty = is_tty(self._stream()) if tty is None else bool(tty)
    self.enabled = is_primary() and self.total > 0
    self.min_interval_s, self.line_every_s = min_interval_s, line_every_s
    self.clock = clock
    self._width = width
    self._start = clock()
    self._last = self._start
    self._lines = 0
    self._shown = False
    self._closed = False
    self._previous_live = None
    if self.enabled and self.tty:
      self._previous_live, _state['live'] = _state['live'], self

  def rate(self) -> Optional[float]:
    elapsed = self.clock() - self._start
    return self.done / elapsed if self.done and elapsed > 0 else None

  def text(self) -> str:
    """'extract query: 512/19,871 images  12.3 img/s  ETA 0:26:14'."""
    parts = [f'{self.title}: {self.done:,d}/{self.total:,d} {self.unit}']
    rate = self.rate()
    if rate:
      parts.append(f'{rate:.1f} img/s' if self.unit == 'images' else f'{rate:.1f}/s')
      parts.append(f'ETA {format_duration((self.total - self.done) / rate)}')
    return '  '.join(parts)

  def update(self, n: int) -> None:
    """`n` more items are done."""
    self.done = min(self.done + int(n), self.total)
    if not self.enabled or self._closed:
      return
    now = self.clock()
    if self.tty and now - self._last >= self.min_interval_s:
      self.redraw()
    elif not self.tty and now - self._last >= self.line_every_s and self.done < self.total:
      self._line()

  def _line(self) -> None:
    s = self._stream()
    s.write(self.text() + '\n')
    s.flush()
    self._lines += 1
    self._last = self.clock()

  def redraw(self) -> None:
    if not (self.enabled and self.tty) or self._closed:
      return
    self._show(self._bar(self.done / self.total, self.text()))
    self._last = self.clock()

  def close(self) -> None:
    """Takes the bar off the terminal, or ends a run of plain lines with the total (once)."""
    if self._closed:
      return
    self._closed = True
    if self.enabled and self.tty:
      self.clear()
      if _state['live'] is self:
        _state['live'] = self._previous_live
        if self._previous_live is not None:
          self._previous_live.redraw()
    elif self.enabled and self._lines:
      elapsed = self.clock() - self._start
      s = self._stream()
      s.write(f'{self.title}: {self.done:,d} {self.unit} in {format_duration(elapsed)}\n')
      s.flush()

  def __enter__(self) -> 'CountProgress':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def short_path(path: str) -> str:
  """`path` relative to the working directory when it lies below it, else absolute; a URI
  (gs://...) as it is."""
  if '://' in path:
    return path
  path = os.path.abspath(path)
  rel = os.path.relpath(path)
  return path if rel.startswith('..') else rel
