"""The run console (ogfr_jax/console.py): the progress display on a terminal and in a log,
tables, the header, process 0 only, and the library log level."""

import io
import logging as std_logging

import pytest
from absl import logging

from ogfr_jax import console


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.fixture(autouse=True)
def _console_state():
  """Each test starts as process 0 writing to its own stream, and leaves nothing behind (the
  logging levels and handler are restored by conftest)."""
  saved = dict(console._state)  # pylint: disable=protected-access
  yield
  console._state.clear()  # pylint: disable=protected-access
  console._state.update(saved)  # pylint: disable=protected-access


SUMMARY = {'loss/total': 3.18569, 'loss/student_id': 1.2, 'loss/student_triplet': 0.31,
           'loss/kd_feature': 0.0512, 'loss/kd_logit': 0.8, 'loss/pattern': 0.6,
           'loss/agent': 0.02449, 'lr': 0.003, 'agent/entropy': 18.2, 'grad_norm': 4.0}
# The weights under which SUMMARY's terms add up to its loss: 1.2 + 0.31 + 0.0512 + 0.5 * 0.8
# + 2 * 0.6 + 0.02449 = 3.18569.
WEIGHTS = {'student_id': 1.0, 'student_triplet': 1.0, 'kd_feature': 1.0, 'kd_logit': 0.5,
           'pattern': 2.0, 'agent': 1.0}


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_plain_lines_when_not_a_terminal():
  out = io.StringIO()
  console.set_stream(out)
  d = console.ProgressDisplay(total_steps=200, steps_per_epoch=50, global_batch=32, out=out,
                              loss_weights=WEIGHTS)
  assert not d.tty
  for done in range(1, 101):
    d.advance(done)
  assert out.getvalue() == ''  # nothing between logging windows
  d.report(100, SUMMARY, images_per_sec=320.0)
  d.close()
  lines = out.getvalue().splitlines()
  # 100 steps left at 320 img/s with 32 images a step: 10 s.
  assert lines == ['step 100/200  epoch 2.00  loss 3.186 = id 1.200 + tri 0.310 + kd 0.051 + '
                   'kd-logit 0.400 + other 1.224  lr 3.0e-03  320.0 img/s  ETA 0:00:10']
  assert '\r' not in out.getvalue()


def test_the_terms_on_the_line_add_up_to_the_loss():
  parts = console.loss_parts(SUMMARY, WEIGHTS)
  assert [label for label, _ in parts] == ['id', 'tri', 'kd', 'kd-logit', 'other']
  assert dict(parts)['other'] == pytest.approx(2 * 0.6 + 0.02449)
  assert sum(v for _, v in parts) == pytest.approx(SUMMARY['loss/total'], rel=1e-12)
  # As printed: each of the 5 shown terms is rounded to 3 decimals (at most 5e-4 off).
  text = console.figures_text(SUMMARY, WEIGHTS)
  shown = [float(w) for w in text.split('=')[1].split('lr')[0].split() if w[0].isdigit()]
  assert len(shown) == 5 and abs(sum(shown) - 3.186) <= 5 * 5e-4 + 5e-4
  # Teacher terms group under one label; a run without a term leaves its label out.
  w = {'student_id': 1.0, 'teacher_id': 0.5, 'teacher_triplet': 0.5}
  s = {'loss/total': 2.0, 'loss/student_id': 1.0, 'loss/teacher_id': 1.2,
       'loss/teacher_triplet': 0.8}
  assert console.loss_parts(s, w) == [('id', 1.0), ('teacher', 1.0)]
  assert console.loss_legend(w) == ('progress: loss = id + teacher, each times its config.loss '
                                    'weight (student ID, teacher ID + triplet)')
  assert console.loss_legend(WEIGHTS).startswith(
      'progress: loss = id + tri + kd + kd-logit + other, ')
  assert console.loss_legend(WEIGHTS).endswith('KD logit, pattern + agent)')
  assert console.figures_text(SUMMARY) == 'loss 3.186  lr 3.0e-03'


def test_bar_is_redrawn_in_place_on_a_terminal():
  term = _Terminal()
  console.set_stream(term)
  clock = _Clock()
  d = console.ProgressDisplay(total_steps=100, steps_per_epoch=10, global_batch=8, out=term,
                              clock=clock, min_interval_s=0.5, width=200)
  assert d.tty
  d.advance(1)
  clock.t = 0.1
  d.advance(2)  # within min_interval_s of the last drawing: not redrawn
  assert term.getvalue().count('\r\x1b[2K') == 1
  clock.t = 1.0
  d.report(50, SUMMARY, images_per_sec=80.0)
  assert term.getvalue().count('\r\x1b[2K') == 2
  last = term.getvalue().split('\r\x1b[2K')[-1]
  assert last.startswith('[##########..........]  50%  step  50/100  epoch 5.00  loss 3.186')
  assert last.endswith('80.0 img/s  ETA 0:00:05')  # 50 steps x 8 images at 80 img/s
  # A line printed meanwhile lands above the bar, which comes back under it.
  console.say('evaluation at step 50')
  after = term.getvalue().split('evaluation at step 50\n')[1]
  assert after.startswith('\r\x1b[2K[##########')
  d.close()  # the final state stays on its own line
  assert term.getvalue().endswith('\r\x1b[2K' + d.bar_text() + '\n') and '\n' not in last
  closed = term.getvalue()
  d.close()  # again (the loop's clean-up): nothing more
  d.advance(60)
  console.say('results')
  assert term.getvalue() == closed + 'results\n'


def test_bar_fits_the_terminal_width():
  term = _Terminal()
  d = console.ProgressDisplay(total_steps=10, steps_per_epoch=5, global_batch=8, out=term,
                              width=40)
  d.report(3, SUMMARY, 12.0)
  assert len(term.getvalue().split('\r\x1b[2K')[-1]) == 39


def test_only_process_zero_prints():
  term = _Terminal()
  console.set_stream(term)
  console.set_process(1)
  d = console.ProgressDisplay(total_steps=10, steps_per_epoch=5, global_batch=8, out=term)
  d.advance(1)
  d.report(2, SUMMARY, 12.0)
  console.say('header')
  console.print_evaluation(2, {'synthetic': {'mAP': 0.5, 'rank1': 0.6}})
  d.close()
  assert term.getvalue() == ''
  assert console.tag() == '[process 1] '


def test_tables():
  lines = console.results_table({'synthetic': {'rank1': 0.5, 'rank5': 0.75, 'rank10': 0.875,
                                               'mAP': 0.41803, 'mINP': 0.125, 'step': 60},
                                 'manifest': {'git': 'x'}})
  assert lines == ['  dataset     rank1   rank5  rank10     mAP    mINP',
                   '  synthetic  0.5000  0.7500  0.8750  0.4180  0.1250']
  out = io.StringIO()
  console.set_stream(out)
  console.print_final({'synthetic': {'mAP': 0.25, 'step': 120},
                       'fepm': {'gallery': {'precision': 0.5, 'recall': 0.25, 'chance': 0.1},
                                'train': None,
                                'teacher_clean': {'mAP': 0.2}, 'teacher_purified': {'mAP': 0.3}}},
                      [('results', 'wd/results.json'), ('checkpoint', 'wd/checkpoints/120')],
                      wall_time_s=75.0)
  assert out.getvalue().splitlines() == [
      'results at step 120 (0:01:15 wall time)',
      '  dataset    rank1  rank5  rank10     mAP  mINP',
      '  synthetic      -      -       -  0.2500     -',
      '  FEPM selection: gallery precision 0.500 (a random pick: 0.100) recall 0.250',
      '  teacher mAP 0.3000 purified vs 0.2000 clean',
      'wrote',
      '  results     wd/results.json',
      '  checkpoint  wd/checkpoints/120']


def test_header_keeps_room_for_extra_lines():
  out = io.StringIO()
  console.set_stream(out)
  lines = console.header('OGFR train: configs/x.py', [('data', 'a'), ('workdir', 'runs/x')],
                         notes=['mesh data=2 x fsdp=4', 'state 1.2 GB per device'])
  assert lines == ['OGFR train: configs/x.py', '  data     a', '  workdir  runs/x',
                   '  mesh data=2 x fsdp=4', '  state 1.2 GB per device']
  assert out.getvalue() == '\n'.join(lines) + '\n'


def test_library_info_hidden_unless_asked(capfd):
  logger = std_logging.getLogger('orbax.fake')
  handler = std_logging.StreamHandler()  # what absl's handler does outside app.run
  std_logging.getLogger().addHandler(handler)
  try:
    console.configure_logging(None)
    logging.info('absl info hidden')
    logger.info('orbax info hidden')
    logger.warning('orbax warning shown')
    console.configure_logging(console.verbosity_of('info'))
    logger.info('orbax info shown')
  finally:
    std_logging.getLogger().removeHandler(handler)
  err = capfd.readouterr().err
  assert 'hidden' not in err
  assert 'orbax warning shown' in err and 'orbax info shown' in err
  assert console.verbosity_of('DEBUG') == 1 and console.verbosity_of(None) is None
  with pytest.raises(ValueError, match='--log_level'):
    console.verbosity_of('loud')


def test_warnings_of_other_processes_are_tagged(capfd):
  handler = std_logging.StreamHandler()
  std_logging.getLogger().addHandler(handler)
  absl_handler = logging.get_absl_handler()
  try:
    console.configure_logging(None)
    handler.addFilter(absl_handler.filters[-1])
    handler.setFormatter(console._ShortFormatter())  # pylint: disable=protected-access
    console.set_process(3)
    std_logging.getLogger('ogfr').warning('disk almost full')
  finally:
    std_logging.getLogger().removeHandler(handler)
  assert capfd.readouterr().err == 'warning: [process 3] disk almost full\n'


def test_count_progress_in_a_log_and_on_a_terminal():
  out = io.StringIO()
  console.set_stream(out)
  clock = _Clock()
  # A short extraction prints nothing into a log.
  with console.CountProgress(96, 'synthetic query', out=out, clock=clock) as p:
    clock.t = 5.0
    p.update(96)
  assert out.getvalue() == ''
  # A long one: a line at most every line_every_s, then the total.
  with console.CountProgress(1000, 'synthetic gallery', out=out, clock=clock,
                             line_every_s=30.0) as p:
    clock.t += 10.0
    p.update(100)  # 10 s in: no line yet
    clock.t += 30.0
    p.update(300)  # 400 images in 40 s: 10 img/s, 600 left: 60 s
  assert out.getvalue().splitlines() == [
      'synthetic gallery: 400/1,000 images  10.0 img/s  ETA 0:01:00',
      'synthetic gallery: 400 images in 0:00:40']
  # On a terminal: a bar in place, taken off at the end; a line said meanwhile lands above it.
  term = _Terminal()
  console.set_stream(term)
  with console.CountProgress(200, 'extract', out=term, clock=clock, width=200) as p:
    clock.t += 1.0
    p.update(100)
    console.say('note')
  text = term.getvalue()
  assert '[##########..........]  50%  extract: 100/200 images  100.0 img/s  ETA 0:00:01' in text
  assert 'note\n' in text and text.endswith('\r\x1b[2K')
  # Other processes show nothing.
  console.set_process(1)
  quiet = io.StringIO()
  with console.CountProgress(10, 'x', out=quiet, clock=clock, line_every_s=0.0) as p:
    clock.t += 1.0
    p.update(5)
  assert quiet.getvalue() == ''
