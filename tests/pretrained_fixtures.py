"""The pretrained-weight tests' shared pieces: the committed timm parity fixtures, tiny
configs on their patch size, and parameter trees to import into."""

import json
import os

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from ogfr_jax import train_state
from ogfr_jax.models import build
from ogfr_jax.models import vit as vit_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'parity')
MANIFEST = json.load(open(os.path.join(FIXTURES, 'manifest.json')))
WEIGHTS = os.path.join(FIXTURES, MANIFEST['weights'])


# A tiny ViT with the committed fixtures' patch size on 64 x 64 images.
PARITY = {'model.size': 'tiny', 'model.patch_size': MANIFEST['patch'], 'model.stride': 16,
          'input.height': 64, 'input.width': 64}
NARROW = {**PARITY, 'input.width': 48, 'model.stride': 12}
ERASE = ('student_erase',)


def zero_params(config, num_cameras=2):
  """The OGFR 'params' tree for `config`, as numpy zeros (shapes from eval_shape: no compute)."""
  model = build.build_model(config, 3, num_cameras)
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.PRNGKey(0)}, train_state.dummy_batch(config, 1), train=False))['params']
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda z: rng.standard_normal(z.shape).astype(z.dtype),
                      zero_params(config))


def flat(tree):
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def plain_vit(config):
  dim, depth, heads = build.vit_size(config)
  return vit_lib.ViT(dim=dim, depth=depth, num_heads=heads, grid=build.token_grid(config),
                     patch_size=config.model.patch_size, stride=config.model.stride,
                     mlp_ratio=config.model.mlp_ratio)


def timm_tensors():
  return load_file(WEIGHTS)


def rows_by_key(report):
  return {r.key: r for r in report.rows}
