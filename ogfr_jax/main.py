r"""Entry point: train and evaluate, or evaluate the latest checkpoint.

  python -m ogfr_jax.main --config configs/synthetic.py --workdir runs/synthetic
  python -m ogfr_jax.main --config configs/occluded_duke.py \
      --config.dataset.root=/data/Occluded_Duke --workdir runs/oduke
  python -m ogfr_jax.main --config configs/synthetic.py --workdir runs/synthetic --mode eval

Any config field can be overridden with --config.FIELD=VALUE. The resolved config is written
to WORKDIR/config.json once every check has passed (a refused run leaves the workdir as it
was); re-running on a workdir with checkpoints resumes the run.

Several processes (hosts) run the same command. On Cloud TPU VMs and in SLURM steps with
several tasks they find each other by themselves (--distributed=auto); anywhere else pass
  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I [--local_device_ids=0,1]
to each process. launch/ holds scripts for TPU pods, SLURM and a local multi-process test.

The console (console.py) shows a short header, one progress display, each evaluation as a
table and, at the end, the results and the paths written; library INFO logs are hidden
unless asked for with --verbosity=0 (INFO), --verbosity=1 (DEBUG) or --log_level=info|debug.
A user-facing error (a bad flag or config, a workdir or dataset that cannot be used, a refused
checkpoint file, a corrupt image, a non-finite loss) ends the run with one line
`error: ...` on stderr and exit status 2 (tools/cli.py); --verbosity=1 or OGFR_TRACEBACK=1
prints its traceback above that line.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from ogfr_jax import console
from ogfr_jax import out_of_memory
from ogfr_jax import parallel
from ogfr_jax import run_config
from ogfr_jax.tools import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/NAME.py[:ARGS]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (resuming if possible), then evaluate. '
                          'eval: evaluate the latest checkpoint in --workdir.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Start afresh in a --workdir that holds a run of a different config '
    '(its checkpoints are deleted, once every other check has passed).')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', list(parallel.DISTRIBUTED_MODES),
    'Multi-process start-up. auto: start when --coordinator_address/--num_processes/'
    '--process_id are given, or on a Cloud TPU VM / pod, in a SLURM step with several tasks, '
    'or with JAX_COORDINATOR_ADDRESS set; on: always call jax.distributed.initialize (other '
    'clusters jax detects, e.g. Open MPI); off: single process.')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, reachable from every process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes-1.')
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    'local_device_ids', None, 'Accelerators this process drives (e.g. 0,1,2,3); default: all '
    'visible ones (under SLURM: the one at SLURM_LOCALID).')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', 300, 'Seconds to wait for all processes to join.')
_LOG_LEVEL = flags.DEFINE_enum(
    'log_level', None, list(console.LOG_LEVELS),
    'Logs on stderr besides the console: debug, info (library INFO logs: absl, orbax, jax), '
    'warning or error. Default: warnings and errors. Same as --verbosity=1/0/-1/-2.')
flags.mark_flags_as_required(['config', 'workdir'])


_HELP_FLAGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one clear line for config mistakes instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    # absl prints the help asked for with --help / --helpshort / --helpfull and exits 1; a
    # help that was asked for is a success.
    if e.code == 1 and any(arg.split('=')[0] in _HELP_FLAGS for arg in argv[1:]):
      raise SystemExit(0) from None
    raise
  except flags.Error as e:
    _fail_early(f'{cli.one_line(e)} (--helpshort lists the flags)')
  except OSError as e:
    # A --config file that cannot be loaded, met while applying a --config.X override.
    _fail_early(_config_load_message(_config_argument(argv), e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail_early('bad --config override: '
                + cli.one_line(ValueError(run_config.describe_config_error(e, argv))))


def _config_argument(argv: list[str]) -> str:
  """The value of --config on the command line (as typed), '' if absent."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _config_load_message(path: str, error: BaseException) -> str:
  """'--config PATH: cannot load the config file (<the innermost reason>)'."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  reason = f' ({lines[-1]})' if lines else ''
  return f'--config {path}: cannot load the config file{reason}'


def _fail_early(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(cli.EXIT_STATUS)


def _verbosity() -> int | None:
  """The absl verbosity the command asked for (--log_level, else --verbosity), or None."""
  level = console.verbosity_of(_LOG_LEVEL.value)
  if level is None and flags.FLAGS['verbosity'].present:
    level = int(flags.FLAGS.verbosity)
  return level


def _show_traceback() -> bool:
  level = _verbosity()
  return (level is not None and level >= 1) or cli.traceback_requested()


def _config() -> ml_collections.ConfigDict:
  """--config's ConfigDict; a file that cannot be loaded is an OSError naming it."""
  try:
    config = _CONFIG.value
    config.keys()  # a file that failed to load gives a placeholder that raises here
    return config
  except OSError as e:
    path = config_flags.get_config_filename(flags.FLAGS['config'])
    raise FileNotFoundError(_config_load_message(path, e)) from e


def start_processes() -> None:
  """Joins the other processes of a multi-host run; before any other JAX call."""
  try:
    parallel.initialize_distributed(
        _COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        parallel.parse_device_ids(_LOCAL_DEVICE_IDS.value), mode=_DISTRIBUTED.value,
        timeout_s=_INIT_TIMEOUT.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def _check_workdir(workdir: str) -> None:
  """A local --workdir must be a folder (or not exist yet)."""
  if '://' in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f'--workdir {workdir} is a file, not a folder: pass a folder '
                             '(it is created if missing)')
  parent = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(f'--workdir {workdir}: {parent} is a file, not a folder')


# Errors that end a run with one line (cli.USER_ERRORS: ValueError, which includes
# DatasetError, CorruptImageError and UnsafeCheckpointError, and OSError); anything else is a
# bug and keeps its traceback.
_USER_ERRORS = cli.USER_ERRORS + (FloatingPointError, app.UsageError)


def main(argv: list[str]) -> None:
  console.configure_logging(_verbosity())
  try:
    with out_of_memory.as_user_error(lambda: _CONFIG.value):
      _main(argv)
  except _USER_ERRORS as e:
    console.clear_live()
    cli.fail(e, show_traceback=_show_traceback(), tag=console.tag().strip())


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _config()
  start_processes()
  import jax  # pylint: disable=g-import-not-at-top
  console.set_process(jax.process_index())
  run_config.validate(config)
  _check_workdir(_WORKDIR.value)
  if _OVERWRITE.value and _MODE.value != 'train':
    raise app.UsageError('--overwrite starts a training run afresh; it does not apply to '
                         f'--mode {_MODE.value}')
  from ogfr_jax import train  # pylint: disable=g-import-not-at-top  (after flags: jax init)
  name = config_flags.get_config_filename(flags.FLAGS['config'])
  # Both check the workdir before they write anything there (a refused run changes nothing).
  if _MODE.value == 'train':
    results = train.train_and_evaluate(config, _WORKDIR.value, config_name=name,
                                       overwrite=_OVERWRITE.value)
  else:
    results = train.evaluate_checkpoint(config, _WORKDIR.value, config_name=name)
  logging.info('results: %s', results)


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
