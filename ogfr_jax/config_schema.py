"""What a valid config is: the allowed values of every choice field and the checks between
fields, beside the defaults in `config_defaults.base_config()`.

The two modules are the only places that know a field's default or its allowed values:
everything else reads fields by attribute (a config always starts from the base config, and a
config.json read back is merged onto it by `from_json`). `validate` runs once when a config
is loaded (main, the tools) and raises ValueError naming the field.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections

from ogfr_jax import config_defaults

# field -> allowed values. Model-side names come from the modules that implement them.
CHOICES: dict[str, tuple[Any, ...]] = {
    'init_format': ('auto', 'npz', 'torch', 'safetensors', 'orbax'),
    'model.size': tuple(config_defaults.VIT_SIZES),
    'model.dtype': ('float32', 'bfloat16', 'auto'),
    'model.remat': ('none', 'dots', 'block'),
    'model.kernels': ('plain', 'cpu'),
    'model.attention_impl': ('xla', 'cudnn', 'auto'),
    'model.pattern_head_input': ('feat', 'bn_feat'),
    'fepm.selection': ('agent', 'random', 'oracle'),
    'fepm.baseline': ('self_critical', 'leave_one_out'),
    'loss.kd_feature_input': ('feat', 'bn_feat'),
    'loss.triplet_feature_input': ('feat', 'bn_feat'),
    'loss.student_triplet_views': ('all', 'unoccluded'),
    'optim.name': ('sgd', 'adamw'),
    'optim.schedule': ('warmup_cosine', 'transreid'),
    'input.train_resize': ('bilinear', 'bicubic'),
    'eval.unseen_camera': ('mean', 'index'),
    'eval.feature': ('pre_bn', 'post_bn'),
    'eval.rerank_mode': ('exact', 'approx', 'auto'),
    'input.corrupt_image_policy': ('fail', 'skip'),
    'input.donor_exchange': ('device', 'host'),
    'train.nonfinite_policy': ('stop', 'skip'),
    'train.damaged_checkpoint': ('fall_back', 'refuse'),
}

_AT_LEAST_ONE = ('input.ids_per_batch', 'input.images_per_id', 'input.eval_batch_size',
                 'input.height', 'input.width', 'model.patch_size', 'model.stride',
                 'train.log_every', 'train.checkpoint_every', 'train.stop_check_every',
                 'eval.query_chunk', 'eval.rerank_k1', 'eval.rerank_k2',
                 'eval.rerank_max_bytes', 'fepm.num_samples')
_NON_NEGATIVE = ('input.device_prefetch', 'loss.agent_consistency_weight',
                 'fepm.consistency_memory', 'optim.lr_floor')


def field(config: Any, name: str) -> Any:
  value = config
  for part in name.split('.'):
    value = value[part]
  return value


def check_choice(value: Any, name: str) -> None:
  allowed = CHOICES[name]
  if value not in allowed:
    raise ValueError(f'config.{name}={value!r}: must be one of {list(allowed)}')


def _merge(base: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
  for key, value in values.items():
    name = f'{prefix}{key}'
    if key not in base:
      raise ValueError(f'config.{name}: unknown config field')
    if isinstance(base[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ValueError(f'config.{name}: expected a section, got {value!r}')
      _merge(base[key], value, name + '.')
    else:
      with base.ignore_type():
        base[key] = tuple(value) if isinstance(value, list) else value


def from_json(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config read back from JSON (WORKDIR/config.json) merged onto the base config, so that
  fields added since the run was written read as their defaults; unknown fields are refused."""
  config = config_defaults.base_config()
  for name in config_defaults.EXTENSIONS:
    if name in values:
      config_defaults.extend(config, name)
  _merge(config, values, '')
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for a config that cannot run."""
  from ogfr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  names = set(datasets.dataset_names())
  if config.dataset.name not in names:
    raise ValueError(f'config.dataset.name={config.dataset.name!r}: must be one of '
                     f'{sorted(names)}')
  if config.dataset.test_name and config.dataset.test_name not in names:
    raise ValueError(f'config.dataset.test_name={config.dataset.test_name!r}: must be one of '
                     f'{sorted(names)}')
  for name in CHOICES:
    check_choice(field(config, name), name)
  from ogfr_jax import evaluator  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(config.eval.evaluators) - set(evaluator.EVALUATORS))
  if unknown:
    raise ValueError(f'config.eval.evaluators: unknown {unknown}; known: '
                     f'{list(evaluator.EVALUATORS)}')
  from ogfr_jax import source_weights  # pylint: disable=g-import-not-at-top
  if (config.init_from and not source_weights.is_named(config.init_from)
      and not os.path.exists(config.init_from)):
    raise ValueError(f'config.init_from={config.init_from!r}: no such file or folder')
  for name in _AT_LEAST_ONE:
    if int(field(config, name)) < 1:
      raise ValueError(f'config.{name}={field(config, name)} must be >= 1')
  for name in _NON_NEGATIVE:
    if field(config, name) < 0:
      raise ValueError(f'config.{name}={field(config, name)} must be >= 0')
  if not 0.0 <= config.train.max_skipped_share <= 1.0:
    raise ValueError(f'config.train.max_skipped_share={config.train.max_skipped_share} must be '
                     'in [0, 1]')
  if config.train.epochs <= 0:
    raise ValueError(f'config.train.epochs={config.train.epochs} must be > 0')
  if config.model.patch_size > min(config.input.height, config.input.width):
    raise ValueError(f'config.model.patch_size={config.model.patch_size} is larger than the '
                     f'input {config.input.height}x{config.input.width}')
  _validate_model(config)
  from ogfr_jax.data import occlusion  # pylint: disable=g-import-not-at-top
  occlusion.check_names(config)
  e = config.eval
  if e.rerank_topn < max(e.rerank_k1 + 1, e.rerank_k2):
    raise ValueError(f'config.eval.rerank_topn={e.rerank_topn} must be >= max('
                     f'config.eval.rerank_k1 + 1, config.eval.rerank_k2) = '
                     f'{max(e.rerank_k1 + 1, e.rerank_k2)}')


def _validate_model(config: ml_collections.ConfigDict) -> None:
  """Ranges that depend on the backbone's depth and token grid."""
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import fepm  # pylint: disable=g-import-not-at-top
  depth = config_defaults.VIT_SIZES[config.model.size][1]
  m, f = config.model, config.fepm
  if build.has_fepm(config):
    layer = build.resolve_layer(f.layer, depth)
    if not 0 <= layer < depth:
      raise ValueError(f'config.fepm.layer={f.layer} resolves to {layer}; the selection must '
                       f'act before one of the {depth} blocks, so it must be in '
                       f'[0, {depth - 1}] (or [-{depth}, -1] from the end)')
    lo, hi = (float(v) for v in f.prob_bounds)
    if not 0.0 <= lo < hi <= 1.0:
      raise ValueError(f'config.fepm.prob_bounds={tuple(f.prob_bounds)}: need 0 <= lo < hi <= 1')
    window, grid = tuple(f.score_window), build.token_grid(config)
    if (len(window) != 2 or any(int(w) != w or w < 1 or w % 2 == 0 for w in window)
        or window[0] > grid[0] or window[1] > grid[1]):
      raise ValueError(f'config.fepm.score_window={window}: need two odd sizes (rows, cols) '
                       f'of at most the {grid[0]} x {grid[1]} token grid')
    if not 0.0 < f.share < 1.0:
      raise ValueError(f'config.fepm.share={f.share} must be in (0, 1)')
    if not 0.0 <= f.warmup_fraction < 1.0:
      raise ValueError(f'config.fepm.warmup_fraction={f.warmup_fraction} must be in [0, 1)')
    if f.selection == 'random':
      gh, gw = build.token_grid(config)
      fepm.num_selected(f.random_fraction, gh * gw)
    if f.baseline == 'leave_one_out' and f.num_samples < 2:
      raise ValueError("config.fepm.baseline='leave_one_out' compares each sampled action "
                       'with the others of its image: set config.fepm.num_samples >= 2')
    blocks = build.consistency_blocks(config)
    if not layer <= blocks <= depth:
      raise ValueError(f'config.fepm.consistency_block={f.consistency_block} resolves to the '
                       f'output of block {blocks}; it must be in [{layer}, {depth}] (from '
                       f'config.fepm.layer={f.layer} to the last of the {depth} blocks; '
                       f'negative counts from the end, -1 is the last block)')
  if build.agent_learns_consistency(config) and config.input.images_per_id < 2:
    raise ValueError('config.loss.agent_consistency_weight needs config.input.images_per_id '
                     ">= 2: its labels compare each image with the identity's other images "
                     'in the batch')
  if 'student_erase' in config:
    from ogfr_jax.models import student  # pylint: disable=g-import-not-at-top
    e = config.student_erase
    if e.detector not in student.DETECTORS:
      raise ValueError(f'config.student_erase.detector={e.detector!r}: must be one of '
                       f'{list(student.DETECTORS)}')
    if e.enabled and not config.occlusion.enabled:
      raise ValueError('config.student_erase.enabled needs config.occlusion.enabled: the '
                       "student's occluder head trains on the synthesised occluders")
    if not 0 <= e.layer <= depth:
      raise ValueError(f'config.student_erase.layer={e.layer}: the occluder head reads the '
                       f'tokens after that many of the {depth} student blocks, so it must be '
                       f'in [0, {depth}]')
