r"""Entry point: train and evaluate, or evaluate the latest checkpoint.

  python -m ogfr_jax.main --config configs/synthetic.py --workdir runs/synthetic
  python -m ogfr_jax.main --config configs/occluded_duke.py \
      --config.dataset.root=/data/Occluded_Duke --workdir runs/oduke
  python -m ogfr_jax.main --config configs/synthetic.py --workdir runs/synthetic --mode eval

Any config field can be overridden with --config.FIELD=VALUE. The resolved config is written
to WORKDIR/config.json; re-running on a workdir with checkpoints resumes the run.

Several processes (hosts) run the same command. On Cloud TPU VMs and in SLURM steps with
several tasks they find each other by themselves (--distributed=auto); anywhere else pass
  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I [--local_device_ids=0,1]
to each process. launch/ holds scripts for TPU pods, SLURM and a local multi-process test.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ogfr_jax import parallel
from ogfr_jax import run_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/NAME.py[:ARGS]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (resuming if possible), then evaluate. '
                          'eval: evaluate the latest checkpoint in --workdir.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Start afresh in a --workdir that holds a run of a different config '
    '(its checkpoints are removed).')
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
flags.mark_flags_as_required(['config', 'workdir'])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one clear line for config mistakes instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nPass --helpshort for the flags.')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f'error: bad --config override: {run_config.describe_config_error(e, argv)}')


def start_processes() -> None:
  """Joins the other processes of a multi-host run; before any other JAX call."""
  try:
    parallel.initialize_distributed(
        _COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        parallel.parse_device_ids(_LOCAL_DEVICE_IDS.value), mode=_DISTRIBUTED.value,
        timeout_s=_INIT_TIMEOUT.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  start_processes()
  config = _CONFIG.value
  try:
    run_config.validate(config)
    run_config.prepare_workdir(_WORKDIR.value, config, overwrite=_OVERWRITE.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  from ogfr_jax import train  # pylint: disable=g-import-not-at-top  (after flags: jax init)
  from ogfr_jax.data import image_io  # pylint: disable=g-import-not-at-top
  # Faults of the data or of the numbers end with their message, not a traceback; anything
  # else is a bug and keeps its traceback.
  try:
    if _MODE.value == 'train':
      results = train.train_and_evaluate(config, _WORKDIR.value)
    else:
      results = train.evaluate_checkpoint(config, _WORKDIR.value)
  except (FloatingPointError, FileNotFoundError, image_io.CorruptImageError) as e:
    sys.exit(f'error: {e}')
  logging.info('results: %s', results)


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
