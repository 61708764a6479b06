"""OGFR: the holistic teacher (with FEPM) and the occlusion-aware student, in one Flax module.

`OGFR` owns every parameter and names it; `Teacher` and `Student` (models/teacher.py,
models/student.py) hold the branches' behaviour and receive those modules as fields (Flax
module sharing). Build it with `models.build.build_model(config, ...)`, the only reader of
config.model and config.fepm; every field here is explicit.

Parameter tree (top-level names under 'params'):
  teacher_vit, student_vit   the two backbones (only `student_vit` without a teacher)
  teacher_head, student_head BNNeck + ID classifier of each branch (always separate)
  teacher_part_head, student_part_head   per-part BNNeck + classifiers (JPM)
  pattern_embed              [K+1, D] occlusion pattern embeddings (student.num_patterns > 0)
  pattern_head               linear pattern classifier on the student's BNNeck (or CLS) feature
  fepm                       the replacement token ('replace_token'), trained by the teacher's
                             losses like any backbone parameter
  student_erase, occluder_head   the student's replacement token and its per-token occluder
                             classifier (student.erase)
  occluder_vit               the occluder classifier's own patch embedding and first blocks
                             (student.erase.separate); filled from init_from like the backbones
  agent                      the token-scoring policy: the only module named 'agent', so the
                             optimizer can give it its own update rule by path
'batch_stats' holds the BNNeck running statistics of each head and, under teacher_branch, the
FEPM state the train step updates without a gradient: the consistency labels' identity memory
(fepm.consistency_memory) and the running threshold of the quantile greedy rule.

Rng streams: 'dropout' (stochastic depth, pattern dropout) and 'agent' (action sampling) in
training; evaluation needs none, except random selection, which falls back to a fixed key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ogfr_jax.models import fepm as fepm_lib
from ogfr_jax.models import vit as vit_lib
from ogfr_jax.models.student import EraseSpec, Student
from ogfr_jax.models.teacher import FEPMSpec, Teacher


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """The keyword arguments of `vit.ViT` shared by every backbone of a model."""
  dim: int
  depth: int
  num_heads: int
  grid: tuple[int, int]
  patch_size: int = 16
  stride: int = 16
  mlp_ratio: float = 4.0
  num_cameras: int = 0
  sie: bool = False
  sie_weight: float = 3.0
  drop_path: float = 0.0
  jpm: bool = False
  jpm_shift: int = vit_lib.JPM_SHIFT
  jpm_shuffle_groups: int = vit_lib.JPM_SHUFFLE_GROUPS
  jpm_parts: int = vit_lib.JPM_PARTS
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  remat: str = 'none'
  kernels: str = 'plain'

  def make(self, **overrides) -> vit_lib.ViT:
    return vit_lib.ViT(**{**dataclasses.asdict(self), **overrides})


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  fepm: Optional[FEPMSpec] = None  # None: no purification
  agent_hidden: int = 128
  prior_logit: float = -2.0


@dataclasses.dataclass(frozen=True)
class StudentSpec:
  num_patterns: int = 0  # K + 1 pattern embeddings; 0: none
  pattern_dropout: float = 0.0
  pattern_head_input: str = 'bn_feat'
  erase: Optional[EraseSpec] = None


class OGFR(nn.Module):
  """Teacher (None: the student-only baseline) and occlusion-aware student."""
  backbone: BackboneSpec
  num_classes: int
  student: StudentSpec = StudentSpec()
  teacher: Optional[TeacherSpec] = TeacherSpec()

  def setup(self):
    b, s, t = self.backbone, self.student, self.teacher
    self.student_vit = student_vit = b.make()
    if t is not None:
      self.teacher_vit = teacher_vit = b.make()

    self.student_head = vit_lib.ReIDHead(self.num_classes)
    if b.jpm:
      self.student_part_head = vit_lib.ReIDHead(self.num_classes)
    pattern_head = None
    if s.num_patterns:
      self.pattern_embed = self.param('pattern_embed', vit_lib.TRUNC_INIT,
                                      (s.num_patterns, b.dim), jnp.float32)
      self.pattern_head = pattern_head = nn.Dense(s.num_patterns,
                                                  kernel_init=vit_lib.TRUNC_INIT)
    eraser = occluder_head = occluder_vit = None
    if s.erase is not None:
      self.student_erase = eraser = fepm_lib.TokenReplacement()
      if s.erase.separate:
        self.occluder_vit = occluder_vit = b.make(depth=s.erase.layer, jpm=False)
      # Starts by predicting ~12% occluder probability everywhere, as the FEPM agent does.
      self.occluder_head = occluder_head = nn.Dense(
          1, kernel_init=vit_lib.TRUNC_INIT, bias_init=nn.initializers.constant(-2.0))
    self.student_branch = Student(
        vit=student_vit, head=self.student_head,
        part_head=self.student_part_head if b.jpm else None, pattern_head=pattern_head,
        pattern_dropout=s.pattern_dropout, pattern_head_input=s.pattern_head_input,
        erase=s.erase, eraser=eraser,
        occluder_head=occluder_head, occluder_vit=occluder_vit)

    if t is not None:
      self.teacher_head = vit_lib.ReIDHead(self.num_classes)
      if b.jpm:
        self.teacher_part_head = vit_lib.ReIDHead(self.num_classes)
      replacement = agent = None
      if t.fepm is not None:
        self.fepm = replacement = fepm_lib.TokenReplacement()
        if t.fepm.selection == 'agent':
          self.agent = agent = fepm_lib.Agent(hidden=t.agent_hidden, prior_logit=t.prior_logit)
      self.teacher_branch = Teacher(
          vit=teacher_vit, head=self.teacher_head,
          part_head=self.teacher_part_head if b.jpm else None, fepm=t.fepm,
          replacement=replacement, agent=agent)

  def _table(self) -> Optional[jax.Array]:
    return self.pattern_embed if self.student.num_patterns else None

  # --- entry points -------------------------------------------------------------------------

  def __call__(self, batch: dict[str, jax.Array], *, train: bool,
               purify: Any = True) -> dict[str, Any]:
    """Training forward of both branches.

    batch: image [B,H,W,3] (x), occluded [B,H,W,3] (occ(x)), camid, pattern, pid ([B] int32);
    occ_mask [B,H,W] (1 on the synthesised occluder's pixels) for the student's erasure and
    contam_mask [B,H,W] (planted contamination of x) for the oracle selection.
    Returns {'teacher', 'student'[, 'agent']}. In training the teacher's action is sampled,
    otherwise greedy; `purify` False keeps the teacher's own pass clean (a warm-up phase).
    Call with mutable=['batch_stats'] when train=True.
    """
    out = {}
    if self.teacher is not None:
      out.update(self.teacher_branch(batch['image'], batch['camid'], batch['pid'], train=train,
                                     contam_mask=batch.get('contam_mask'), purify=purify,
                                     index=batch.get('index')))
    out['student'] = self.student_branch(batch['occluded'], batch['camid'], batch['pattern'],
                                         table=self._table(), train=train,
                                         occ_mask=batch.get('occ_mask'))
    return out

  def extract(self, image: jax.Array, camid: jax.Array, *,
              feature: str = 'pre_bn') -> jax.Array:
    """Student inference features, not normalised (see `Student.extract`)."""
    return self.student_branch.extract(image, camid, table=self._table(), feature=feature)

  def teacher_selection(self, image: jax.Array, camid: jax.Array,
                        contam_mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """The teacher's evaluation-time selection on a batch: {'mask' [B, N] bool, 'scores'
    [B, N] float32 (agent logits; zeros without an agent)}. N = gh * gw patch tokens in
    row-major order of `build.token_grid(config)`."""
    if self.teacher is None or self.teacher.fepm is None:
      raise ValueError('teacher_selection needs a teacher with FEPM (model.teacher and '
                       'fepm.enabled)')
    return self.teacher_branch.selection(image, camid, contam_mask)

  def teacher_features(self, image: jax.Array, camid: jax.Array, *, purify: bool,
                       contam_mask: Optional[jax.Array] = None,
                       feature: str = 'pre_bn') -> jax.Array:
    """The teacher's inference features with its greedy purification or without."""
    if self.teacher is None:
      raise ValueError('the model has no teacher (model.teacher=False)')
    return self.teacher_branch.features(image, camid, purify=purify, contam_mask=contam_mask,
                                        feature=feature)
