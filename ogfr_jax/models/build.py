"""The one reader of config.model and config.fepm: config -> explicit module fields.

`build_model(config, num_classes, num_cameras)` returns an `OGFR` whose every choice is a
dataclass field (big_vision's `Model(num_classes, **config.model)`, flax lm1b's
`TransformerConfig`). The helpers below answer the questions other modules ask of a config's
model (token grid, sizes, backbone names), so that nothing else reads config.model.

Values are validated when the config is loaded (`config_schema.validate`); the builder can
therefore trust them.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ogfr_jax import config_defaults
from ogfr_jax import precision
from ogfr_jax.models import fepm as fepm_lib
from ogfr_jax.models import vit as vit_lib
from ogfr_jax.models.ogfr import OGFR, BackboneSpec, StudentSpec, TeacherSpec
from ogfr_jax.models.student import EraseSpec
from ogfr_jax.models.teacher import FEPMSpec

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def token_grid(config: Any) -> tuple[int, int]:
  """(gh, gw) of the patch-token grid for config.input and config.model."""
  return vit_lib.patch_grid(config.input.height, config.input.width, config.model.patch_size,
                            config.model.stride)


def vit_size(config: Any) -> tuple[int, int, int]:
  """(width, depth, heads) of config.model.size."""
  if config.model.size not in config_defaults.VIT_SIZES:
    raise ValueError(f'model.size={config.model.size!r}: use one of '
                     f'{sorted(config_defaults.VIT_SIZES)}')
  return config_defaults.VIT_SIZES[config.model.size]


def resolve_layer(layer: int, depth: int) -> int:
  """fepm.layer resolved: negative counts from the end (-1: before the last block)."""
  return depth + layer if layer < 0 else layer


def fepm_layer(config: Any) -> int:
  """L: the number of teacher blocks that run before the selection acts."""
  return resolve_layer(int(config.fepm.layer), vit_size(config)[1])


def num_patterns(config: Any) -> int:
  """K + 1: the occlusion pattern ids 0 (none) .. K."""
  return len(config.occlusion.patterns) + 1


def has_teacher(config: Any) -> bool:
  return bool(config.model.teacher)


def has_fepm(config: Any) -> bool:
  """FEPM lives in the teacher; without a teacher it does not exist."""
  return has_teacher(config) and bool(config.fepm.enabled)


def has_agent(config: Any) -> bool:
  return has_fepm(config) and config.fepm.selection == 'agent'


def has_pattern_embed(config: Any) -> bool:
  return bool(config.model.pattern_embed)


def student_erases(config: Any) -> bool:
  """The student's occluder-token erasure (the `student_erase` extension section) is on."""
  return 'student_erase' in config and bool(config.student_erase.enabled)


def agent_learns_consistency(config: Any) -> bool:
  """The agent's auxiliary: flag the tokens the identity's other batch images do not explain."""
  return has_agent(config) and config.loss.agent_consistency_weight > 0


def backbone_names(config: Any) -> tuple[str, ...]:
  """Top-level parameter names holding a ViT backbone (for pretrained-weight import)."""
  extra = (('occluder_vit',) if student_erases(config)
           and config.student_erase.detector == 'separate' else ())
  return (('teacher_vit', 'student_vit') if has_teacher(config) else ('student_vit',)) + extra


def batch_keys(config: Any) -> tuple[str, ...]:
  """The keys of an input batch the model reads in training, beyond the always-present
  image, occluded, pattern, pid and camid."""
  keys = ()
  if student_erases(config):
    keys += ('occ_mask',)
  if has_fepm(config) and config.fepm.selection == 'oracle':
    keys += ('contam_mask',)
  if agent_learns_consistency(config) and config.fepm.consistency_memory:
    keys += ('index',)
  return keys


def backbone_spec(config: Any, num_cameras: int) -> BackboneSpec:
  m = precision.resolve(config).model  # 'auto' dtype and attention for this backend
  dim, depth, heads = vit_size(config)
  return BackboneSpec(
      dim=dim, depth=depth, num_heads=heads, grid=token_grid(config),
      patch_size=m.patch_size, stride=m.stride, mlp_ratio=m.mlp_ratio,
      num_cameras=max(int(num_cameras), 1), sie=bool(m.sie), sie_weight=m.sie_weight,
      drop_path=m.drop_path, jpm=bool(m.jpm), dtype=DTYPES[m.dtype],
      attention_impl=m.attention_impl, remat=m.remat, kernels=m.kernels)


def consistency_blocks(config: Any) -> int:
  """fepm.consistency_block resolved to a block count in [0, depth]: the consistency labels
  compare the tokens after that many blocks (negative counts from the end: -1 is the last
  block's output)."""
  depth, v = vit_size(config)[1], int(config.fepm.consistency_block)
  return depth + 1 + v if v < 0 else v


def fepm_spec(config: Any) -> FEPMSpec | None:
  if not has_fepm(config):
    return None
  f, m = config.fepm, config.model
  n = token_grid(config)[0] * token_grid(config)[1]
  return FEPMSpec(
      layer=fepm_layer(config), selection=f.selection,
      k=fepm_lib.num_selected(f.random_fraction, n) if f.selection == 'random' else 1,
      prob_bounds=(float(f.prob_bounds[0]), float(f.prob_bounds[1])),
      num_samples=int(f.num_samples), greedy_pass=f.baseline == 'self_critical',
      consistency=agent_learns_consistency(config),
      consistency_blocks=consistency_blocks(config),
      consistency_memory=int(f.consistency_memory),
      score_window=(int(f.score_window[0]), int(f.score_window[1])),
      share=float(f.share), patch_size=m.patch_size, stride=m.stride)


def student_spec(config: Any) -> StudentSpec:
  m = config.model
  erase = None
  if student_erases(config):
    e = config.student_erase
    erase = EraseSpec(layer=int(e.layer), separate=e.detector == 'separate',
                      patch_size=m.patch_size, stride=m.stride)
  return StudentSpec(
      num_patterns=num_patterns(config) if has_pattern_embed(config) else 0,
      pattern_dropout=float(m.pattern_dropout), pattern_head_input=m.pattern_head_input,
      erase=erase)


def teacher_spec(config: Any) -> TeacherSpec | None:
  if not has_teacher(config):
    return None
  return TeacherSpec(fepm=fepm_spec(config), agent_hidden=int(config.fepm.agent_hidden),
                     prior_logit=float(config.fepm.prior_logit))


def build_model(config: Any, num_classes: int, num_cameras: int) -> OGFR:
  """The OGFR module of `config` for `num_classes` training identities and a camera table of
  `num_cameras` rows (at least 1)."""
  return OGFR(backbone=backbone_spec(config, num_cameras), num_classes=int(num_classes),
              student=student_spec(config), teacher=teacher_spec(config))
