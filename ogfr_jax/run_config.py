"""Config checks and the workdir's config.json.

`validate` catches values that ml_collections' type checks cannot (names, ranges, divisibility)
before anything is built. `prepare_workdir` writes the resolved config as JSON and refuses a
workdir that holds a run of a different config, so two runs never mix checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import ml_collections

from ogfr_jax import config_defaults

# Fields that may differ when a run is resumed: they change logging or speed, not results.
RESUMABLE_FIELDS = (
    'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
    'input.num_workers', 'input.prefetch', 'input.device_prefetch', 'eval.query_chunk',
    # Checkpoints restore into any mesh: results do not depend on the device layout.
    'mesh.data', 'mesh.fsdp',
    # Recomputation in the backward pass changes memory and time, not results.
    'model.remat',
    # Switching 'stop' to 'skip' is how a run stopped by a non-finite step goes on.
    'train.nonfinite_policy', 'train.stop_check_every',
)


def describe_config_error(error: Exception, argv: list[str]) -> str:
  """One line naming the offending --config.FIELD for an override that failed to apply."""
  overrides = [a for a in argv if a.startswith('--config.')]
  text = str(error).strip('\'"').replace('\\n', ' ').replace('\n', ' ')
  match = re.search(r"'([A-Za-z0-9_]+)'", text)
  culprit = next((a.split('=')[0] for a in overrides
                  if match and a.split('=')[0].endswith('.' + match.group(1))), None)
  if culprit:
    return f'{culprit}: unknown config field ({text})'
  return f'{text} (overrides: {" ".join(overrides) or "none"})'


def _choice(value: Any, allowed, field: str) -> None:
  if value not in allowed:
    raise ValueError(f'config.{field}={value!r}: must be one of {sorted(allowed)}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for a config that cannot run."""
  from ogfr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  names = set(datasets.dataset_names())
  _choice(config.dataset.name, names, 'dataset.name')
  if config.dataset.test_name:
    _choice(config.dataset.test_name, names, 'dataset.test_name')
  _choice(config.init_format, {'auto', 'npz', 'torch', 'safetensors', 'orbax'}, 'init_format')
  if config.init_from and not os.path.exists(config.init_from):
    raise ValueError(f'config.init_from={config.init_from!r}: no such file or folder')
  _choice(config.model.size, config_defaults.VIT_SIZES, 'model.size')
  _choice(config.model.dtype, {'float32', 'bfloat16'}, 'model.dtype')
  from ogfr_jax.models import vit  # pylint: disable=g-import-not-at-top
  _choice(config.model.get('remat', 'none'), set(vit.REMAT_CHOICES), 'model.remat')
  _choice(config.model.pattern_test_policy, {'none', 'soft'}, 'model.pattern_test_policy')
  _choice(config.fepm.selection, {'agent', 'random'}, 'fepm.selection')
  _choice(config.fepm.action, {'bernoulli', 'topk'}, 'fepm.action')
  _choice(config.fepm.baseline, {'self_critical', 'moving_average'}, 'fepm.baseline')
  _choice(config.loss.kd_feature, {'mse', 'cos', 'both'}, 'loss.kd_feature')
  _choice(config.loss.kd_feature_input, {'feat', 'bn_feat'}, 'loss.kd_feature_input')
  _choice(config.loss.get('triplet_feature_input', 'feat'), {'feat', 'bn_feat'},
          'loss.triplet_feature_input')
  _choice(config.loss.get('student_triplet_views', 'all'), {'all', 'unoccluded'},
          'loss.student_triplet_views')
  _choice(config.model.pattern_head_input, {'feat', 'bn_feat'}, 'model.pattern_head_input')
  _choice(config.optim.name, {'sgd', 'adamw'}, 'optim.name')
  _choice(config.eval.feature, {'pre_bn', 'post_bn'}, 'eval.feature')
  _choice(config.input.corrupt_image_policy, {'fail', 'skip'}, 'input.corrupt_image_policy')
  _choice(config.train.get('nonfinite_policy', 'stop'), {'stop', 'skip'}, 'train.nonfinite_policy')
  for field in ('input.ids_per_batch', 'input.images_per_id', 'input.eval_batch_size',
                'input.height', 'input.width', 'model.patch_size', 'model.stride',
                'train.log_every', 'train.checkpoint_every', 'train.stop_check_every'):
    section, name = field.split('.')
    if int(config[section][name]) < 1:
      raise ValueError(f'config.{field}={config[section][name]} must be >= 1')
  if config.model.patch_size > min(config.input.height, config.input.width):
    raise ValueError(f'config.model.patch_size={config.model.patch_size} is larger than the '
                     f'input {config.input.height}x{config.input.width}')
  if config.model.get('student_erase', False):
    if not config.occlusion.enabled:
      raise ValueError('config.model.student_erase needs config.occlusion.enabled: the '
                       "student's occluder head trains on the synthesised occluders")
    from ogfr_jax.models import ogfr  # pylint: disable=g-import-not-at-top
    ogfr.student_erase_layer(config)
    ogfr.erase_detector(config)
  if config.train.epochs <= 0:
    raise ValueError(f'config.train.epochs={config.train.epochs} must be > 0')
  _validate_input_and_eval(config)


def _validate_input_and_eval(config: ml_collections.ConfigDict) -> None:
  """Device prefetch, ranking chunk and re-ranking fields."""
  if int(config.input.get('device_prefetch', 2)) < 0:
    raise ValueError(f'config.input.device_prefetch={config.input.device_prefetch} must be >= 0')
  if int(config.eval.query_chunk) < 1:
    raise ValueError(f'config.eval.query_chunk={config.eval.query_chunk} must be >= 1')
  e = config.eval
  _choice(e.get('rerank_mode', 'auto'), {'exact', 'approx', 'auto'}, 'eval.rerank_mode')
  for field in ('rerank_k1', 'rerank_k2', 'rerank_max_bytes'):
    if int(e.get(field, 1)) < 1:
      raise ValueError(f'config.eval.{field}={e[field]} must be >= 1')
  topn = int(e.get('rerank_topn', 100))
  if topn < max(int(e.rerank_k1) + 1, int(e.rerank_k2)):
    raise ValueError(f'config.eval.rerank_topn={topn} must be >= max(config.eval.rerank_k1 + 1, '
                     f'config.eval.rerank_k2) = {max(int(e.rerank_k1) + 1, int(e.rerank_k2))}')


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def config_diff(old: dict, new: dict) -> list[str]:
  a, b = _flatten(old), _flatten(new)
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
          for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS]


def _saved_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps in WORKDIR/checkpoints (orbax's unfinished *-tmp folders aside)."""
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, *,
                    overwrite: bool = False) -> None:
  """Creates the workdir and writes config.json (process 0 only)."""
  import jax  # pylint: disable=g-import-not-at-top
  new = json.loads(config.to_json_best_effort())
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON ({e}); move it away or pass --overwrite') from e
    diff = config_diff(old, new)
    if diff and not overwrite:
      saved = _saved_steps(workdir)
      raise ValueError(
          f'{workdir} holds a run of a different config; refusing to mix them. Differences:\n  '
          + '\n  '.join(diff) + '\nUse another --workdir, or pass --overwrite to start afresh '
          + (f'(removes its checkpoints of steps {saved}).' if saved else
             '(it has no checkpoint yet, so nothing is lost).'))
    if diff and overwrite and jax.process_index() == 0:
      shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(new, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  from ogfr_jax import manifest  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'manifest.json'), 'w') as f:
    json.dump(manifest.run_manifest(config), f, indent=2, sort_keys=True)
