"""User-facing errors of the command-line tools: one line `error: ...` on stderr, exit status 2,
the traceback only when asked for (OGFR_TRACEBACK=1 for the argparse tools, --verbosity=1 for
tools.convert, which parses absl flags); a bug keeps its traceback.

The argparse tools run in-process through `cli.run_cli` (what their `__main__` does); a few
cases run as `python -m ...` subprocesses to cover that wiring and the absl tool. Nothing here
trains: workdirs hold a config.json and at most a checkpoint-less folder.
"""

import os
import pickle
import subprocess
import sys

import pytest

from ogfr_jax import config_defaults
from ogfr_jax import run_config
from ogfr_jax.data import datasets
from ogfr_jax.tools import cli
from ogfr_jax.tools import export
from ogfr_jax.tools import extract
from ogfr_jax.tools import plot_training
from ogfr_jax.tools import reevaluate
from ogfr_jax.tools import visrank

import dataset_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(main_fn, argv, capsys):
  """(exit status, stderr lines) of `cli.run_cli(main_fn, argv)`."""
  with pytest.raises(SystemExit) as e:
    cli.run_cli(main_fn, argv)
  return e.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(status, lines, *needles):
  assert status == 2, (status, lines)
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def config_only_workdir(tmp_path):
  """A workdir as training leaves it before its first checkpoint: config.json only."""
  wd = str(tmp_path / 'run')
  run_config.prepare_workdir(wd, config_defaults.base_config())
  return wd


def test_missing_workdir(tmp_path, capsys):
  missing = str(tmp_path / 'no_such_run')
  status, lines = run_tool(extract.main, ['--workdir', missing, '--images', str(tmp_path),
                                          '--out', str(tmp_path / 'f.npz')], capsys)
  assert_one_line_error(status, lines, os.path.join(missing, 'config.json'), 'not found')


def test_missing_checkpoint(config_only_workdir, tmp_path, capsys):
  status, lines = run_tool(export.main, ['--workdir', config_only_workdir, '--safetensors',
                                         str(tmp_path / 's.safetensors')], capsys)
  assert_one_line_error(status, lines, os.path.join(config_only_workdir, 'checkpoints'))


def test_existing_output_and_lossy_export(config_only_workdir, tmp_path, capsys):
  out = tmp_path / 's.safetensors'
  out.write_bytes(b'keep me')
  status, lines = run_tool(export.main, ['--workdir', config_only_workdir, '--safetensors',
                                         str(out)], capsys)
  assert_one_line_error(status, lines, str(out), '--overwrite')
  # A run whose features the export cannot represent: refused before any work.
  config = config_defaults.base_config()
  config.model.jpm = True
  lossy_wd = str(tmp_path / 'jpm_run')
  run_config.prepare_workdir(lossy_wd, config)
  status, lines = run_tool(export.main, ['--workdir', lossy_wd, '--safetensors', str(out),
                                         '--overwrite'], capsys)
  assert_one_line_error(status, lines, 'model.jpm', '--allow-lossy')
  assert out.read_bytes() == b'keep me'


def test_bad_arguments(tmp_path, capsys):
  status, lines = run_tool(visrank.main, ['--workdir'], capsys)
  assert_one_line_error(status, lines, 'python -m ogfr_jax.tools.visrank', '--workdir')
  status, lines = run_tool(plot_training.main, [], capsys)
  assert_one_line_error(status, lines, 'the following arguments are required: --workdir')
  status, lines = run_tool(reevaluate.main, ['--workdir', str(tmp_path), '--bogus'], capsys)
  assert_one_line_error(status, lines, 'unrecognized arguments: --bogus')
  status, lines = run_tool(reevaluate.main, ['--workdir', str(tmp_path), '--set',
                                             'model.size=base'], capsys)
  assert_one_line_error(status, lines, 'only test-time fields')
  status, lines = run_tool(extract.main, ['--workdir', str(tmp_path), '--images', 'x', '--out',
                                          'y', '--batch-size', 'many'], capsys)
  assert_one_line_error(status, lines, "invalid int value: 'many'")


def test_dataset_error_is_one_line(tmp_path, capsys):
  tree = fx.make_dukemtmc(tmp_path)  # read with the wrong reader: no name parses
  status, lines = run_tool(lambda argv: datasets.get_dataset('market1501', tree.root), [],
                           capsys)
  assert_one_line_error(status, lines, str(tree.root / 'bounding_box_train'),
                        '0002_c1s1_000451_03.jpg')


def test_traceback_on_request_and_for_bugs(tmp_path, capsys, monkeypatch):
  argv = ['--workdir', str(tmp_path / 'none'), '--images', '.', '--out', 'f.npz']
  monkeypatch.setenv(cli.TRACEBACK_ENV, '1')
  status, lines = run_tool(extract.main, argv, capsys)
  assert status == 2 and lines[0] == 'Traceback (most recent call last):'
  assert lines[-1].startswith('error: ') and 'config.json' in lines[-1]
  monkeypatch.setenv(cli.TRACEBACK_ENV, '0')
  status, lines = run_tool(extract.main, argv, capsys)
  assert_one_line_error(status, lines, 'config.json')

  def buggy(argv):
    del argv
    return {}['no such key']
  with pytest.raises(KeyError):  # not user-facing: Python's traceback and status
    cli.run_cli(buggy, [])


def test_multi_line_messages_become_one_line():
  assert cli.one_line(ValueError('first\n  second\n\nthird')) == 'first; second; third'
  assert cli.one_line(FileNotFoundError()) == 'FileNotFoundError'


# ---------------------------------------------------------------------------------------------
# As programs


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def _python_m(module, args, traceback=False):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  env.pop(cli.TRACEBACK_ENV, None)
  if traceback:
    env[cli.TRACEBACK_ENV] = '1'
  res = subprocess.run([sys.executable, '-m', module] + args, capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
  return res.returncode, res.stderr.strip().splitlines()


def test_convert_refuses_a_malicious_file_in_one_line(tmp_path):
  marker = tmp_path / 'MARKER'
  evil = tmp_path / 'evil.pth'
  evil.write_bytes(pickle.dumps({'state_dict': {'w': _RunsCode(marker)}}, protocol=2))
  args = ['--input', str(evil), '--output', str(tmp_path / 'out'), '--config',
          os.path.join(ROOT, 'configs', 'synthetic.py')]
  status, lines = _python_m('ogfr_jax.tools.convert', args)
  assert_one_line_error(status, lines, str(evil), 'arbitrary Python objects')
  status, lines = _python_m('ogfr_jax.tools.convert', args + ['--verbosity=1'])
  assert status == 2 and 'Traceback (most recent call last):' in lines
  assert lines[-1].startswith('error: ') and 'UnsafeCheckpointError' in '\n'.join(lines)
  assert not marker.exists() and not (tmp_path / 'out').exists()
  status, lines = _python_m('ogfr_jax.tools.convert', ['--export-student', str(tmp_path),
                                                       '--output', str(tmp_path / 'x'),
                                                       '--no-such-flag'])
  assert_one_line_error(status, lines, 'no-such-flag', '--helpshort')
  status, lines = _python_m('ogfr_jax.tools.convert', ['--export-student', str(tmp_path)])
  assert_one_line_error(status, lines, '--output is required')


def test_argparse_tool_as_a_program(tmp_path):
  args = ['--workdir', str(tmp_path / 'none'), '--images', str(tmp_path), '--out',
          str(tmp_path / 'f.npz')]
  status, lines = _python_m('ogfr_jax.tools.extract', args)
  assert_one_line_error(status, lines, 'config.json')
  status, lines = _python_m('ogfr_jax.tools.extract', args, traceback=True)
  assert status == 2 and 'Traceback (most recent call last):' in lines


# ---------------------------------------------------------------------------------------------
# ogfr_jax.main and data.inspect as programs: every case fails before the first train step.

MARKET_RUNLOCAL = os.path.join(ROOT, 'configs', 'market1501.py') + ':runlocal'


def _main(tmp_path, *args, config=MARKET_RUNLOCAL):
  return _python_m('ogfr_jax.main', ['--config', config, '--workdir', str(tmp_path / 'wd'),
                                     *map(str, args)])


def test_main_missing_config_file(tmp_path):
  status, lines = _main(tmp_path, config='configs/nosuch.py')
  assert_one_line_error(status, lines, '--config configs/nosuch.py', 'No such file')
  assert not (tmp_path / 'wd').exists()


def test_main_workdir_that_is_a_file(tmp_path):
  (tmp_path / 'wd').write_text('not a folder')
  status, lines = _main(tmp_path)
  assert_one_line_error(status, lines, f'--workdir {tmp_path / "wd"}', 'is a file')


def test_main_market_tree_with_foreign_file_names(tmp_path):
  tree = fx.make_dukemtmc(tmp_path)
  # The dataset's warning about the ignored names is a warning (kept), not library INFO.
  status, lines = _main(tmp_path, f'--config.dataset.root={tree.root}')
  assert status == 2 and lines[0].startswith('warning: market1501: ignoring 5 image file(s)')
  assert all(l.startswith(('warning: ', 'error: ')) for l in lines), lines
  assert_one_line_error(status, lines[-1:], str(tree.root / 'bounding_box_train'),
                        '0001_c1_f0000107.jpg', '<pid>_c<camera>s<sequence>_<frame>_<box>.jpg')
  # --verbosity=1: the traceback above the same line, and library INFO logs back.
  status, verbose = _main(tmp_path, f'--config.dataset.root={tree.root}', '--verbosity=1')
  assert status == 2 and 'Traceback (most recent call last):' in verbose
  # (INFO lines may follow it: jax logs its clean-up at exit.)
  assert [l for l in verbose if l.startswith('error: ')] == lines[-1:]
  assert any(l.startswith('I') and 'xla_bridge' in l for l in verbose), verbose[:5]


def test_main_empty_query_folder(tmp_path):
  tree = fx.make_market1501(tmp_path)
  for f in (tree.root / 'query').iterdir():
    f.unlink()
  status, lines = _main(tmp_path, f'--config.dataset.root={tree.root}')
  assert_one_line_error(status, lines, 'query is empty', str(tree.root / 'query'))


@pytest.mark.parametrize('patterns,needles', [
    ("('object','nosuch')", ('config.occlusion.patterns', 'nosuch', 'known types')),
    # A comma-separated override arrives as one name; the error shows the tuple to write.
    ('object,crop', ('config.occlusion.patterns', "\"('object', 'crop')\"")),
])
def test_main_bad_occlusion_pattern_fails_at_config_load(tmp_path, patterns, needles):
  tree = fx.make_market1501(tmp_path)
  status, lines = _main(tmp_path, f'--config.dataset.root={tree.root}',
                        f'--config.occlusion.patterns={patterns}')
  # Checked with the config, before the run header, the model and the workdir.
  assert_one_line_error(status, lines, *needles)
  assert not (tmp_path / 'wd').exists()


def test_main_refuses_a_malicious_init_from(tmp_path):
  tree = fx.make_market1501(tmp_path)
  marker = tmp_path / 'MARKER'
  evil = tmp_path / 'evil.pth'
  evil.write_bytes(pickle.dumps({'state_dict': {'w': _RunsCode(marker)}}, protocol=2))
  status, lines = _main(tmp_path, f'--config.dataset.root={tree.root}',
                        f'--config.init_from={evil}')
  assert status == 2 and lines[-1].startswith('error: ')
  assert_one_line_error(status, lines[-1:], str(evil), 'arbitrary Python objects')
  assert not [l for l in lines[:-1] if not l.startswith('warning: ')], lines  # warnings only
  assert not marker.exists()


def test_inspect_bad_folder_and_bad_arguments(tmp_path):
  tree = fx.make_dukemtmc(tmp_path)
  status, lines = _python_m('ogfr_jax.data.inspect', ['--dataset', 'market1501', '--root',
                                                      str(tree.root)])
  assert status == 2 and not [l for l in lines[:-1] if not l.startswith('WARNING')], lines
  assert_one_line_error(status, lines[-1:], str(tree.root / 'bounding_box_train'),
                        '0001_c1_f0000107.jpg')
  from ogfr_jax.data import inspect  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    cli.run_cli(inspect.main, ['--dataset', 'market1501'])
  assert e.value.code == 2


def test_main_missing_config_file_with_overrides(tmp_path):
  # The override is applied to a config that failed to load: still the same one line.
  status, lines = _main(tmp_path, '--config.train.epochs=4', '--config.seed=3',
                        config='configs/nope.py')
  assert_one_line_error(status, lines, '--config configs/nope.py: cannot load the config file',
                        'No such file')
  assert not (tmp_path / 'wd').exists()


@pytest.mark.parametrize('override,needles', [
    ('--config.train.epochz=4', ('--config.train.epochz: unknown config field',
                                 "'epochz'", 'Did you mean "epochs"')),
    # A field under the wrong section: where it lives, found in the config tree.
    ('--config.model.init_from=w.npz', ('--config.model.init_from: no such field',
                                        'init_from lives at the top level: --config.init_from')),
    ('--config.train.lr=0.1', ('--config.train.lr: no such field',
                               'lr lives in config.optim: --config.optim.lr')),
])
def test_main_bad_override_names_the_field(tmp_path, override, needles):
  status, lines = _main(tmp_path, override)
  assert_one_line_error(status, lines, 'bad --config override: ', *needles)
  assert '\\' not in lines[0]
  assert not (tmp_path / 'wd').exists()


def test_main_market_tree_with_an_empty_image(tmp_path):
  tree = fx.make_market1501(tmp_path)
  empty = sorted(p for p in (tree.root / 'bounding_box_train').glob('*.jpg')
                 if not p.name.startswith('.'))[1]
  empty.write_bytes(b'')
  status, lines = _main(tmp_path, f'--config.dataset.root={tree.root}')
  assert status == 2 and all(l.startswith(('warning: ', 'error: ')) for l in lines), lines
  assert_one_line_error(status, lines[-1:], str(tree.root / 'bounding_box_train'),
                        empty.name, '0 bytes', 'corrupt_image_policy=skip')
  assert not (tmp_path / 'wd').exists()
  # Under the skip policy the scan warns, naming it, and the run reads on.
  splits = datasets.get_dataset('market1501', tree.root, empty_images='skip')
  assert str(empty) in splits.train.paths
  empty.with_name('0001_c1s1_000001_00.jpg').write_bytes(b'')  # pid 1 is in no split
  with pytest.raises(datasets.DatasetError, match=r'2 image file\(s\) of 0 bytes in .*: '
                     rf'0001_c1s1_000001_00\.jpg, {empty.name}'):
    datasets.get_dataset('market1501', tree.root)


def test_main_help_exits_zero(tmp_path):
  res = subprocess.run([sys.executable, '-m', 'ogfr_jax.main', '--help'], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       timeout=120)
  assert res.returncode == 0 and '--workdir' in res.stdout + res.stderr
