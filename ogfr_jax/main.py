r"""Entry point: train and evaluate, or evaluate the latest checkpoint.

  python -m ogfr_jax.main --config configs/synthetic.py --workdir runs/synthetic
  python -m ogfr_jax.main --config configs/occluded_duke.py \
      --config.dataset.root=/data/Occluded_Duke --workdir runs/oduke
  python -m ogfr_jax.main --config configs/synthetic.py --workdir runs/synthetic --mode eval

Any config field can be overridden with --config.FIELD=VALUE. The resolved config is written
to WORKDIR/config.json; re-running on a workdir with checkpoints resumes the run.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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
flags.mark_flags_as_required(['config', 'workdir'])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one clear line for config mistakes instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nPass --helpshort for the flags.')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f'error: bad --config override: {run_config.describe_config_error(e, argv)}')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  run_config.validate(config)
  run_config.prepare_workdir(_WORKDIR.value, config, overwrite=_OVERWRITE.value)
  from ogfr_jax import train  # pylint: disable=g-import-not-at-top  (after flags: jax init)
  if _MODE.value == 'train':
    results = train.train_and_evaluate(config, _WORKDIR.value)
  else:
    results = train.evaluate_checkpoint(config, _WORKDIR.value)
  logging.info('results: %s', results)


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
