"""Config checks and the workdir's config.json.

`validate` (config_schema) catches values that ml_collections' type checks cannot (names,
ranges) before anything is built. `check_workdir` refuses a workdir that holds a run of a
different config, so two runs never mix checkpoints; it only reads. `write_workdir` writes the
resolved config as JSON (and the manifest) once every check of the run has passed, so that a
refused run leaves the workdir byte for byte as it was.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import ml_collections

from ogfr_jax import config_schema
from ogfr_jax import paths

# Fields that may differ when a run is resumed: they change logging or speed, not results.
RESUMABLE_FIELDS = (
    'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
    'input.num_workers', 'input.prefetch', 'input.device_prefetch', 'eval.query_chunk',
    # Checkpoints restore into any mesh (values then drift by float rounding, WORKSPACE.md).
    'mesh.data', 'mesh.fsdp',
    # Recomputation in the backward pass changes memory and time, not results.
    'model.remat',
    # Switching 'stop' to 'skip' is how a run stopped by a non-finite step goes on.
    'train.nonfinite_policy', 'train.stop_check_every',
    # What to do with a damaged checkpoint, and when too many skipped steps end a run.
    'train.damaged_checkpoint', 'train.max_skipped_share',
    # Where donor occluder pixels are pasted changes where the work runs, not the pixels.
    'input.donor_exchange',
)


def _config_paths() -> set[str]:
  """Every section and field of the default config, as dotted paths ('train', 'train.epochs')."""
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  paths = set()
  for key in flatten_config(json.loads(config_defaults.base_config().to_json_best_effort())):
    parts = key.split('.')
    paths.update('.'.join(parts[:i]) for i in range(1, len(parts) + 1))
  return paths


def _where_it_lives(field: str, known: set[str]) -> str | None:
  """For an override path that does not exist, where fields of its last name do."""
  leaf = field.rsplit('.', 1)[-1]
  homes = sorted(k for k in known if k.rsplit('.', 1)[-1] == leaf and k != field)
  if not homes:
    return None
  if len(homes) == 1:
    home = homes[0]
    place = ('at the top level' if '.' not in home
             else f'in config.{home.rsplit(".", 1)[0]}')
    return f'{leaf} lives {place}: --config.{home}'
  return f'fields named {leaf}: ' + ', '.join(f'--config.{h}' for h in homes)


def describe_config_error(error: Exception, argv: list[str]) -> str:
  """One line naming the offending --config.FIELD for an override that failed to apply, and,
  for a field that exists elsewhere in the config tree, where it lives."""
  overrides = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')]
  while error.args and isinstance(error.args[0], Exception):  # ml_collections wraps KeyErrors
    error = error.args[0]
  if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
    text = error.args[0]  # str(KeyError) would be the repr, with escaped quotes
  else:
    text = str(error).strip('\'"')
  text = ' '.join(text.replace('\\n', ' ').split())
  known = _config_paths()
  unknown = [a for a in overrides if a[len('--config.'):] not in known]
  match = re.search(r"'([A-Za-z0-9_]+)'", text) or re.fullmatch(r'([A-Za-z0-9_]+)', text)
  named = [a for a in unknown if match and a.endswith('.' + match.group(1))]
  culprit = (named or unknown or [None])[0]
  if culprit:
    home = _where_it_lives(culprit[len('--config.'):], known)
    if home:
      return f'{culprit}: no such field; {home}'
    return f'{culprit}: unknown config field ({text})'
  return f'{text} (overrides: {" ".join(overrides) or "none"})'


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for a config that cannot run (config_schema)."""
  config_schema.validate(config)


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def flatten_config(d: dict) -> dict[str, Any]:
  """{'train.epochs': 120, ...} of a config read from JSON."""
  return _flatten(d)


def config_diff(old: dict, new: dict) -> list[str]:
  a, b = _flatten(old), _flatten(new)
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
          for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS]


def _saved_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps in WORKDIR/checkpoints (orbax's unfinished *-tmp folders aside)."""
  folder = paths.join(workdir, 'checkpoints')
  if not paths.isdir(folder):
    return []
  return sorted(int(name) for name in paths.listdir(folder) if name.isdigit())


def overwrite_note(steps: list[int]) -> str:
  """What --overwrite would cost, for a refusal message."""
  if steps:
    return f'--overwrite starts afresh there and deletes its checkpoints of steps {steps}'
  return '--overwrite starts afresh there (it has no checkpoint yet, so nothing is lost)'


@dataclasses.dataclass
class WorkdirCheck:
  """What `check_workdir` found and what `write_workdir` will do.

  discard: the workdir holds a run of another config and --overwrite was given: its
  checkpoints are removed when the workdir is written (a checkpoint found to belong to another
  run when it is restored sets it too, see train.py).
  """
  workdir: str
  config: dict
  overwrite: bool = False
  discard: bool = False


def check_workdir(workdir: str, config: ml_collections.ConfigDict, *,
                  overwrite: bool = False) -> WorkdirCheck:
  """Refuses a workdir that holds a run of a different config (its config.json); reads only.

  Nothing is written here, and `write_workdir` runs only after every other check of a run
  (the data, the model, the checkpoints' own identity), so a refused run leaves the workdir as
  it found it.
  """
  workdir = paths.resolve(workdir, '--workdir')
  new = json.loads(config.to_json_best_effort())
  check = WorkdirCheck(workdir, new, overwrite=overwrite)
  path = paths.join(workdir, 'config.json')
  if not paths.exists(path):
    return check
  try:
    old = json.loads(paths.read_text(path))
    problem = None if isinstance(old, dict) else 'is not a JSON object'
  except json.JSONDecodeError as e:
    old, problem = None, f'is not valid JSON ({e})'
  diff = [f'config.json: {problem}'] if problem else config_diff(old, new)
  if not diff:
    return check
  if overwrite:
    check.discard = True
    return check
  saved = _saved_steps(workdir)
  if problem:
    raise ValueError(
        f'{path} {problem}, so the config of the run in {workdir} is unknown. Move it away '
        'to resume there (each checkpoint records its config, which is checked against this '
        f'one), or use another --workdir; {overwrite_note(saved)}.')
  raise ValueError(
      f'{workdir} holds a run of a different config; refusing to mix them. Differences '
      '(its config.json -> this command):\n  ' + '\n  '.join(diff)
      + '\nTo resume it, run the command with its values (on the left); to run this config, '
      f'use another --workdir. Nothing was changed in {workdir}; {overwrite_note(saved)}.')


def write_workdir(check: WorkdirCheck, config: ml_collections.ConfigDict, *,
                  layout: dict | None = None) -> None:
  """Creates the workdir and writes config.json and manifest.json (process 0 only), after
  every check of the run passed; with `check.discard` (--overwrite over another run) process 0
  first deletes WORKDIR/checkpoints. Every process returns only once that is done (barriers
  before and after)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  # Barriers (multi-process runs): every process has read the old config.json and checkpoints
  # before process 0 deletes checkpoints or replaces it, and none goes on to write
  # checkpoints before that is done.
  parallel.sync_processes('workdir: old config read')
  if jax.process_index() == 0:
    workdir = check.workdir
    if check.discard:
      paths.rmtree(paths.join(workdir, 'checkpoints'))
    paths.makedirs(workdir)
    paths.write_text(paths.join(workdir, 'config.json'),
                     json.dumps(check.config, indent=2, sort_keys=True))
    from ogfr_jax import manifest  # pylint: disable=g-import-not-at-top
    record = manifest.run_manifest(config)
    if layout is not None:
      record['layout'] = layout
    paths.write_text(paths.join(workdir, 'manifest.json'),
                     json.dumps(record, indent=2, sort_keys=True))
  parallel.sync_processes('workdir: ready')


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, *,
                    overwrite: bool = False) -> None:
  """`check_workdir`, then `write_workdir` (for callers that run no other check)."""
  write_workdir(check_workdir(workdir, config, overwrite=overwrite), config)
