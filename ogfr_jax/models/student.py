"""The occluded student: an Occlusion-Aware ViT on occ(x).

A table of occlusion pattern embeddings E[0..K] (E[0] = none/unknown) is added to every token,
SIE-style, with the pattern id k the synthesiser reports; a linear head predicts k so that the
embedding carries explicit meaning. At test time the pattern is unknown and E[0] is added.

Optional occluder-token erasure (`EraseSpec`; an extension beyond our reading of the paper): a
per-token classifier reads the tokens after the first `layer` blocks (of the student, or of a
separate copy of them), and every embedded patch token is blended towards a learnable token
plus its position embedding by the predicted occluder probability.

Like the teacher, the student holds no parameters of its own: `models.ogfr.OGFR` creates and
names them (the pattern table is passed to each call).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from ogfr_jax.models import fepm as fepm_lib
from ogfr_jax.models import vit as vit_lib
from ogfr_jax.models.teacher import branch_outputs

PATTERN_HEAD_INPUTS = ('bn_feat', 'feat')


DETECTORS = ('student', 'separate')


def add_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the `student_erase` section (off by default) to a config, unless it has one.

  A linear head on the student's tokens after block `layer` predicts which patch tokens show
  an occluder (trained against the synthesis mask with binary cross-entropy at `weight`;
  target: tokens whose window is at least half occluder pixels), each embedded patch token is
  blended towards a learnable token (plus its position embedding) by that probability, and
  the student runs again from the blended tokens. The blend is soft, so a wrong guess costs
  little and the ReID losses also train the head. Costs `layer` extra blocks per image, in
  training and at test. `detector`: whose blocks the head reads, 'student' (the student's own
  first blocks) or 'separate' (a copy of the patch embedding and first `layer` blocks with
  parameters of their own, initialised like the backbones).
  """
  if 'student_erase' in c:
    return c
  with c.unlocked():
    c.student_erase = ml_collections.ConfigDict(
        {'enabled': False, 'layer': 1, 'detector': 'student', 'weight': 1.0})
  return c


@dataclasses.dataclass(frozen=True)
class EraseSpec:
  """The student's occluder-token erasure."""
  layer: int  # student blocks whose output the occluder head reads, in [0, depth]
  separate: bool  # the head reads its own copy of the patch embedding and first blocks
  patch_size: int  # of the backbone: the token windows of the training target
  stride: int


class Student(nn.Module):
  """Occlusion-aware ViT branch (`pattern_head` None: no pattern embeddings)."""
  vit: vit_lib.ViT
  head: vit_lib.ReIDHead
  part_head: Optional[vit_lib.ReIDHead] = None
  pattern_head: Optional[nn.Module] = None
  pattern_dropout: float = 0.0
  pattern_head_input: str = 'bn_feat'
  erase: Optional[EraseSpec] = None
  eraser: Optional[fepm_lib.TokenReplacement] = None
  occluder_head: Optional[nn.Module] = None
  occluder_vit: Optional[vit_lib.ViT] = None

  def _erase_occluders(self, tokens: jax.Array, image: jax.Array, camid: jax.Array,
                       occ_mask: Optional[jax.Array], *, train: bool
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Blends the embedded patch tokens towards the learnable token by the head's occluder
    probability. The blend stays differentiable, so the ReID losses train the head along
    with its own cross-entropy against `occ_mask` (the synthesised view's occluder pixels,
    required in training)."""
    e = self.erase
    if e.separate:
      det = self.occluder_vit
      mid = det.run_blocks(det.embed(image, camid), 0, det.depth, train=train)
    else:
      mid = self.vit.run_blocks(tokens, 0, e.layer, train=train)
    logits = self.occluder_head(mid[:, 1:].astype(jnp.float32))[..., 0]
    out = {'occluder_logits': logits}
    if occ_mask is not None:
      out['occluder_target'] = fepm_lib.covered_tokens(occ_mask, e.patch_size, e.stride)
    elif train:
      raise ValueError("student_erase trains the occluder head on the batch's 'occ_mask' "
                       '(the synthesised occluder pixels), which this batch lacks')
    blended = self.eraser(tokens, jax.nn.sigmoid(logits), self.vit.patch_pos_embed())
    return blended, out

  def forward(self, image: jax.Array, camid: jax.Array, extra: Optional[jax.Array], *,
              train: bool, occ_mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """Branch outputs with the per-image token offset `extra` ([B, D] or None)."""
    tokens = self.vit.embed(image, camid, extra)
    erase = {}
    if self.erase is not None:
      tokens, erase = self._erase_occluders(tokens, image, camid, occ_mask, train=train)
    out, parts = self.vit.tail(tokens, 0, train=train, cls_only=True)
    feat = out[:, 0].astype(jnp.float32)
    res, _ = branch_outputs(self.head, self.part_head, feat,
                            None if parts is None else parts.astype(jnp.float32), train=train)
    res.update(erase)
    if self.pattern_head is not None:
      res['pattern_logits'] = self.pattern_head(
          res['bn_feat'] if self.pattern_head_input == 'bn_feat' else feat)
    return res

  def pattern_offsets(self, table: Optional[jax.Array], pattern: jax.Array, *,
                      train: bool) -> Optional[jax.Array]:
    """E[pattern] per image; with pattern_dropout some are replaced by E[0] in training so
    that the student (and the pattern head) also learn to work without the hint, which is
    the situation at test time."""
    if table is None:
      return None
    pattern = jnp.asarray(pattern, jnp.int32)
    if train and self.pattern_dropout > 0:
      keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - self.pattern_dropout,
                                  pattern.shape)
      pattern = jnp.where(keep, pattern, 0)
    # Ids outside [0, K] give NaN (jnp.take's fill mode): loud rather than silently clamped.
    return jnp.take(table, pattern, axis=0)

  def __call__(self, image: jax.Array, camid: jax.Array, pattern: jax.Array, *,
               table: Optional[jax.Array], train: bool,
               occ_mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """Training forward: the batch's pattern embedding is added (with pattern dropout)."""
    return self.forward(image, camid, self.pattern_offsets(table, pattern, train=train),
                        train=train, occ_mask=occ_mask)

  def extract(self, image: jax.Array, camid: jax.Array, *, table: Optional[jax.Array],
              feature: str = 'pre_bn') -> jax.Array:
    """Inference features, not normalised: [B, D], or with JPM the TransReID concatenation
    [global, part_1/P, ..., part_P/P] of width (1 + P) * D; with E[0] added."""
    extra = None
    if table is not None:
      extra = jnp.broadcast_to(table[0], (image.shape[0], table.shape[1]))
    res = self.forward(image, camid, extra, train=False)
    glob = res['feat'] if feature == 'pre_bn' else res['bn_feat']
    parts = res.get('part_feats' if feature == 'pre_bn' else 'part_bn_feats')
    if parts is None:
      return glob
    b, p, d = parts.shape
    return jnp.concatenate([glob, parts.reshape(b, p * d) / p], axis=-1)
