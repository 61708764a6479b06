"""Rematerialisation of the transformer blocks (config.model.remat) and the CPU formulations of
the backbone's products (model.kernels='cpu', models/cpu_kernels.py): each must give the
numbers of the plain formulation. All in float64 (see TOL).

- remat 'dots' and 'block' leave parameters, loss and gradients as without remat (training
  mode with drop-path, so the dropout rng under remat is covered too);
- the CLS-only last block gives the full block's CLS row, with the plain and the CPU kernels
  (each CPU kernel against its plain counterpart: tests/test_kernels.py);
- a bad model.remat names the field.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ogfr_jax import config_defaults
from ogfr_jax import run_config
from ogfr_jax.models import vit

# Every comparison runs in float64, where the two formulations differ only by rounding: each
# value is a sum of at most a few hundred products here (n <= 512), so their difference is
# bounded by about 2 n eps_64 ~ 2.3e-13 times the sum of the terms' magnitudes. The terms'
# magnitudes exceed the largest result by at most a few hundred times on these random inputs
# (cancellation), so 1e-9 relative to the largest result holds with margin on any machine and
# thread count, while a wrong formula (an O(1) relative error) cannot pass.
TOL = 1e-9
# jax.nn.dot_product_attention (the plain path) rounds the attention logits to float32 even
# for float64 inputs: one rounding of relative size eps_32 = 6e-8 on logits of magnitude
# <= 10 here moves the softmax by <= 6e-7, and two blocks compound that to about 1.2e-6.
# That rounding is a fixed function of the float64 inputs (not of thread count or load);
# comparisons through a whole ViT take 1e-5.
ATTN_TOL = 1e-5
F64 = jnp.float64


@pytest.fixture(autouse=True, scope='module')
def _float64():
  with jax.enable_x64(True):
    yield


def assert_trees_close(a, b, tol=TOL):
  """Leaves equal up to `tol` relative to the largest magnitude of each leaf."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.max(np.abs(y)), 1e-12)
    assert np.max(np.abs(x - y)) <= tol * scale, (np.max(np.abs(x - y)), scale)


def tiny_vit(remat: str, kernels: str = 'plain') -> vit.ViT:
  return vit.ViT(dim=32, depth=2, num_heads=2, grid=(3, 2), patch_size=8, stride=8,
                 drop_path=0.3, remat=remat, dtype=F64, kernels=kernels)


@pytest.fixture(scope='module')
def remat_results(_float64):
  """(params, loss, grads, rematerialised?) per remat mode, from the same parameters and rngs."""
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 24, 16, 3), F64)
  params = jax.tree.map(lambda p: p.astype(F64),
                        tiny_vit('none').init(jax.random.PRNGKey(1), images)['params'])
  out = {}
  for mode in vit.REMAT_CHOICES:
    model = tiny_vit(mode)

    def loss_fn(p, model=model):
      feat, _ = model.apply({'params': p}, images, train=True,
                            rngs={'dropout': jax.random.PRNGKey(2)})
      return jnp.sum(jnp.square(feat))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    own_params = jax.tree.map(lambda p: p.astype(F64),
                              model.init(jax.random.PRNGKey(1), images)['params'])
    jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn))(params))
    rematerialised = re.search(r'\b(remat2|checkpoint)\[', jaxpr) is not None
    out[mode] = (own_params, loss, grads, rematerialised)
  return out


@pytest.mark.parametrize('mode', ['dots', 'block'])
def test_remat_keeps_parameters_loss_and_gradients(remat_results, mode):
  ref_params, ref_loss, ref_grads, ref_remat = remat_results['none']
  params, loss, grads, remat = remat_results[mode]
  assert remat and not ref_remat  # the blocks are (only) rematerialised when asked to
  assert_trees_close(params, ref_params, tol=0.0)  # same names, shapes and initial values
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=ATTN_TOL)
  assert_trees_close(grads, ref_grads, ATTN_TOL)
  # Drop-path is active: some sample's branch was dropped, so the loss is not the
  # deterministic one (which would make the rng handling under remat untested).
  det, _ = tiny_vit(mode).apply({'params': ref_params},
                                jax.random.normal(jax.random.PRNGKey(0), (4, 24, 16, 3), F64),
                                train=False)
  assert abs(float(jnp.sum(jnp.square(det))) - float(ref_loss)) > 1e-3


def test_bad_remat_names_the_field():
  with pytest.raises(ValueError, match='model.remat'):
    tiny_vit('everything').init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 16, 3)))
  config = config_defaults.base_config()
  config.model.remat = 'everything'
  with pytest.raises(ValueError, match='model.remat'):
    run_config.validate(config)


@pytest.mark.parametrize('remat,kernels', [('none', 'plain'), ('block', 'plain'),
                                           ('none', 'cpu')])
def test_cls_only_last_block_matches_the_full_block(remat, kernels):
  """tail(cls_only=True) gives the CLS row of the full tail: values and gradients, training
  mode with drop-path (the same per-sample drops) and JPM reading the pre-last tokens."""
  model = vit.ViT(dim=32, depth=2, num_heads=2, grid=(3, 2), patch_size=8, stride=8,
                  drop_path=0.3, jpm=True, jpm_parts=2, remat=remat, dtype=F64, kernels=kernels)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 24, 16, 3), F64)
  params = jax.tree.map(lambda p: p.astype(F64),
                        model.init(jax.random.PRNGKey(1), images)['params'])

  def run(p, cls_only):
    def fn(module):
      tokens = module.embed(images)
      return module.tail(tokens, 0, train=True, cls_only=cls_only)
    out, parts = nn.apply(fn, model)({'params': p}, rngs={'dropout': jax.random.PRNGKey(2)})
    return out, parts

  full, full_parts = run(params, False)
  cls, cls_parts = run(params, True)
  assert full.shape == (4, 7, 32) and cls.shape == (4, 1, 32)
  assert_trees_close(cls[:, 0], full[:, 0], ATTN_TOL)
  assert_trees_close(cls_parts, full_parts, ATTN_TOL)

  def loss(p, cls_only):
    out, parts = run(p, cls_only)
    return jnp.sum(jnp.square(out[:, 0])) + jnp.sum(jnp.square(parts))

  assert_trees_close(jax.grad(loss)(params, True), jax.grad(loss)(params, False), ATTN_TOL)
  # Drop-path drew the same per-sample masks in both forms and did drop something.
  det, _ = nn.apply(lambda m: m.tail(m.embed(images), 0, train=False, cls_only=True),
                    model)({'params': params})
  assert float(jnp.max(jnp.abs(det[:, 0] - cls[:, 0]))) > 1e-3
