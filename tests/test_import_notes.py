"""The import report's notes on the extra tensors of our own timm export (reid.*)."""

import numpy as np

from ogfr_jax import pretrained


def test_export_extras_are_named_in_the_import_notes():
  tensors = {'patch_embed.proj.weight': np.zeros((64, 3, 16, 16), np.float32),
             pretrained.SIE_TENSOR: np.zeros((4, 64), np.float32),
             pretrained.PATTERN_TENSOR: np.zeros((64,), np.float32),
             pretrained.EXTRA_PREFIX + 'future_extra': np.zeros((1,), np.float32)}
  _, unused, prefix = pretrained._timm_entries(tensors)  # pylint: disable=protected-access
  assert prefix == ''
  assert unused[pretrained.SIE_TENSOR].startswith('camera embedding of an ogfr_jax export')
  assert unused[pretrained.PATTERN_TENSOR].startswith('student pattern embedding E[0]')
  assert unused['reid.future_extra'] == 'ReID extra of an ogfr_jax export: not imported'
  assert pretrained._note_for('blocks.0.unknown') == 'not used by our ViT'  # pylint: disable=protected-access
