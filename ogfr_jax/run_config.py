"""Config checks and the workdir's config.json.

`validate` (config_schema) catches values that ml_collections' type checks cannot (names,
ranges) before anything is built. `prepare_workdir` writes the resolved config as JSON and refuses a
workdir that holds a run of a different config, so two runs never mix checkpoints.
"""

from __future__ import annotations

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


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, *,
                    overwrite: bool = False) -> None:
  """Creates the workdir and writes config.json and manifest.json (process 0 only).

  With --overwrite and a changed config, process 0 first deletes WORKDIR/checkpoints; every
  process returns only once that is done (barriers before and after).
  """
  import jax  # pylint: disable=g-import-not-at-top
  workdir = paths.resolve(workdir, '--workdir')
  new = json.loads(config.to_json_best_effort())
  path = paths.join(workdir, 'config.json')
  diff: list[str] = []
  if paths.exists(path):
    try:
      old = json.loads(paths.read_text(path))
      problem = None if isinstance(old, dict) else 'is not a JSON object'
    except json.JSONDecodeError as e:
      old, problem = None, f'is not valid JSON ({e})'
    if problem and not overwrite:
      saved = _saved_steps(workdir)
      raise ValueError(
          f'{path} {problem}, so the config of the run in {workdir} is unknown. Move it away '
          'to resume there (each checkpoint records its config, which is checked against this '
          'one), or pass --overwrite to start afresh '
          + (f'(removes its checkpoints of steps {saved}).' if saved else
             '(it has no checkpoint yet, so nothing is lost).'))
    diff = [f'config.json: {problem}'] if problem else config_diff(old, new)
    if diff and not overwrite:
      saved = _saved_steps(workdir)
      raise ValueError(
          f'{workdir} holds a run of a different config; refusing to mix them. Differences:\n  '
          + '\n  '.join(diff) + '\nUse another --workdir, or pass --overwrite to start afresh '
          + (f'(removes its checkpoints of steps {saved}).' if saved else
             '(it has no checkpoint yet, so nothing is lost).'))
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  # Barriers (multi-process runs): every process has read the old config.json before
  # process 0 deletes checkpoints or replaces it, and none goes on to the checkpoints
  # (latest_step, restore) before that is done.
  parallel.sync_processes('workdir: old config read')
  if jax.process_index() == 0:
    if diff and overwrite:
      paths.rmtree(paths.join(workdir, 'checkpoints'))
    paths.makedirs(workdir)
    paths.write_text(path, json.dumps(new, indent=2, sort_keys=True))
    from ogfr_jax import manifest  # pylint: disable=g-import-not-at-top
    paths.write_text(paths.join(workdir, 'manifest.json'),
                     json.dumps(manifest.run_manifest(config), indent=2, sort_keys=True))
  parallel.sync_processes('workdir: ready')
