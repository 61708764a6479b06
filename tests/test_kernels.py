"""model.kernels: the 'cpu' formulations (models/cpu_kernels.py) compute what the 'plain'
flax/jax forms compute, alone and inside a ViT, values and gradients.

- the Dense weight-gradient product (both operand orders, float32 and float64) against
  lax.dot_general, with the elementwise bound of a floating-point dot product;
- the erf GELU against jax.nn.gelu(approximate=False), float32 and float64;
- the heads-major attention against a written-out float64 softmax attention and against
  jax.nn.dot_product_attention (the plain path), float32 and float64;
- the cls_only attention (one query row, jax.nn.dot_product_attention under both settings)
  against row 0 of the full attention, for both settings;
- a whole ViT (2 blocks, width 64, 64x32 input, patch 16 stride 12): features, and gradients
  of a scalar loss with respect to every parameter and the image, 'cpu' against 'plain' with
  the same parameters, in float64;
- an unknown model.kernels raises.

Tolerances come from the arithmetic (unit roundoffs U32, U64 and the lengths of the sums), not
from what this machine happens to give, so they hold under any load and XLA thread count
(which only reorders sums, and every bound here holds for any summation order).
Compile budget: one jitted function per check, all with XLA's cheaper CPU optimisation level;
the ViT check compiles one program for both settings.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ogfr_jax.models import cpu_kernels
from ogfr_jax.models import vit

F32, F64 = jnp.float32, jnp.float64
U32, U64 = 2.0 ** -24, 2.0 ** -53  # unit roundoffs: |fl(a op b) - a op b| <= u |a op b|
UNIT = {F32: U32, F64: U64}
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
HIGHEST = jax.lax.Precision.HIGHEST  # true float32 products on every backend (no TF32/bf16)


@pytest.fixture(autouse=True, scope='module')
def _x64():
  """float64 available; every array below is given its dtype explicitly."""
  with jax.enable_x64(True):
    yield


def fast_jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(FAST)


def gamma(n: int, u: float) -> float:
  """Higham's gamma_n: a sum of n products computed in any order in floating point is within
  gamma_n * sum |terms| of the exact sum (Accuracy and Stability of Numerical Algorithms,
  section 3.1)."""
  return n * u / (1 - n * u)


def normal(seed, shape, dtype):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def f64(x):
  return np.asarray(x, np.float64)


def assert_within(ours, ref, bound):
  """|ours - ref| <= bound elementwise (bound broadcasts)."""
  err = np.abs(f64(ours) - f64(ref))
  bound = np.broadcast_to(bound, err.shape)
  worst = np.unravel_index(np.argmax(err - bound), err.shape)
  assert np.all(err <= bound), (err[worst], bound[worst], worst)


def assert_trees_close(ours, ref, rel):
  """Each leaf within `rel` times that leaf's largest magnitude in `ref`."""
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(ref)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
    a, b = f64(a), f64(b)
    scale = np.max(np.abs(b))
    assert scale > 0, jax.tree_util.keystr(path)
    err = np.max(np.abs(a - b))
    assert err <= rel * scale, (jax.tree_util.keystr(path), err / scale, rel)


# --- the softmax attention bound -------------------------------------------------------------
#
# jax.nn.dot_product_attention (the plain path) rounds the logits to float32 and computes the
# softmax in float32 even for float64 inputs. With S >= sum_i |q_i k_i| / sqrt(hd) for every
# (query, key) pair (so |logit| <= S):
#   logits: float32 inputs add up hd products, |d logit| <= gamma_hd S <= (hd + 1) u S (the
#     1/sqrt(hd) scale one more u); float64 inputs are only rounded to float32, <= u S;
#   softmax p_k = exp(l_k - m) / sum_j exp(l_j - m): shifting the logits by d moves log p_k by
#     d_k - sum_j p_j d_j, at most 2 max|d|; exp, the T-term sum and the division add at most
#     (4 + T + 1) u relative (4 u for XLA's exp, a few-ulp polynomial);
# so each probability is within rho * p of the exact one, with
#   rho = (2 (hd + 1) S + T + 5) u   (float32 inputs),   rho = (2 S + T + 5) u32   (float64).
# The forward output sum_k p_k v_k then moves by <= rho sum_k p_k |v_k| <= rho max|v| (plus
# gamma_T of its own sum in float32). In the backward, d logits = p (dp - sum_k p_k dp_k) has
# three terms in p, each moved by <= rho relative, and dq, dk, dv are sums of those. Relative
# to each gradient's largest entry that is <= ATTN_GAIN * rho: 1 (the probabilities) + 3 (the
# softmax backward) + a factor 2 for the largest summed term exceeding the largest result.
ATTN_GAIN = 8.0


def attention_rho(s_bound: float, t: int, hd: int, dtype) -> float:
  if dtype == F32:
    return (2 * (hd + 1) * s_bound + t + 5) * U32
  return (2 * s_bound + t + 5) * U32


def logit_terms_bound(q, k) -> float:
  """max over heads, queries, keys of sum_i |q_i k_i| / sqrt(hd); q, k [B, T, H, hd]."""
  q, k = np.abs(f64(q)), np.abs(f64(k))
  return float(np.max(np.einsum('bqhd,bkhd->bhqk', q, k))) / math.sqrt(q.shape[-1])


def reference_attention(qkv):
  """softmax(q k^T / sqrt(hd)) v, written out in the input dtype: [B, T, 3, H, hd] -> [B, T, D]."""
  b, t, _, h, hd = qkv.shape
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  p = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(hd), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', p, v).reshape(b, t, h * hd)


def plain_attention(qkv):
  b, t, _, h, hd = qkv.shape
  return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(
      b, t, h * hd)


def value_and_vjp(fn, cot, *args):
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(cot)


# --- Dense --------------------------------------------------------------------------------


@pytest.mark.parametrize('dtype', [F32, F64], ids=['float32', 'float64'])
@pytest.mark.parametrize('shape', [(2, 5, 6, 12), (2, 5, 12, 6)],
                         ids=['input_smaller', 'output_smaller'])
def test_cpu_dense_product_matches_dot_general(shape, dtype):
  b, t, k, n = shape
  x, w, cot = normal(0, (b, t, k), dtype), normal(1, (k, n), dtype), normal(2, (b, t, n), dtype)
  dims = (((2,), (0,)), ((), ()))

  def both(x, w, cot):
    return [value_and_vjp(lambda x, w: fn(x, w, dims, precision=HIGHEST), cot, x, w)
            for fn in (cpu_kernels.cpu_dense_dot_general, jax.lax.dot_general)]

  (y, (dx, dw)), (y_ref, (dx_ref, dw_ref)) = fast_jit(both, x, w, cot)(x, w, cot)
  assert y.dtype == dx.dtype == dw.dtype == dtype
  # Each entry is a sum of products (k for y, n for dx, b*t for dw): both results are within
  # gamma of the exact sum times the sum of the terms' magnitudes, so within twice that of
  # each other. The magnitudes are summed here in float64, at most gamma_n(U64) relative off,
  # which the factor 1 + 1e-9 covers.
  u = UNIT[dtype]
  ax, aw, ac = np.abs(f64(x)), np.abs(f64(w)), np.abs(f64(cot))
  slack = 2 * (1 + 1e-9)
  assert_within(y, y_ref, slack * gamma(k, u) * np.einsum('btk,kn->btn', ax, aw))
  assert_within(dx, dx_ref, slack * gamma(n, u) * np.einsum('btn,kn->btk', ac, aw))
  assert_within(dw, dw_ref, slack * gamma(b * t, u) * np.einsum('btk,btn->kn', ax, ac))
  # Other contractions pass through to lax.dot_general unchanged.
  other = (((1,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(cpu_kernels.cpu_dense_dot_general(x, x, other),
                                jax.lax.dot_general(x, x, other))


# --- GELU ---------------------------------------------------------------------------------


@pytest.mark.parametrize('dtype', [F32, F64], ids=['float32', 'float64'])
def test_gelu_matches_jax_gelu(dtype):
  # [-8, 8] spans the negative tail, where the erf form 0.5 x (1 + erf(x / sqrt 2)) loses
  # relative precision (1 + erf cancels) and the erfc form of jax.nn.gelu does not.
  x = jnp.linspace(-8.0, 8.0, 4001, dtype=dtype)
  cot = jnp.cos(x)

  def both(x, cot):
    return [value_and_vjp(fn, cot, x) for fn in
            (cpu_kernels.gelu, lambda x: jax.nn.gelu(x, approximate=False))]

  (y, (dx,)), (y_ref, (dx_ref,)) = fast_jit(both, x, cot)(x, cot)
  assert y.dtype == dx.dtype == dtype
  # Absolute bounds. Value: 0.5 x (1 + e) with e = erf(x / sqrt 2), |e| <= 1: the argument's
  # rounding moves e by <= u |x| phi(x) sqrt 2 <= u, erf itself is a few-ulp polynomial (call
  # it 4 u), 1 + e and two products add 1 u and 2 u: |error| <= 0.5 |x| (4 + 1 + 1 + 4) u =
  # 5 u |x|. jax.nn.gelu: 0.5 x erfc(-x / sqrt 2) with erfc <= 2, erfc to a few ulp (4 u, and
  # the argument's rounding <= u) and two products: |error| <= |x| (4 + 1 + 2) u = 7 u |x|.
  # Derivative Phi(x) + x phi(x): both forms compute the two terms to within ~8 u each
  # (exp, erf/erfc and the products; x^3 phi(x) <= 1.2 bounds the squared argument's
  # rounding), |Phi| <= 1 and |x phi(x)| <= 0.25: each within 8 u (1 + |x|), and times
  # |cot| <= 1. So both differences are within 16 u (1 + |x|).
  bound = 16 * UNIT[dtype] * (1 + np.abs(f64(x)))
  assert_within(y, y_ref, bound)
  assert_within(dx, dx_ref, bound)


# --- attention ------------------------------------------------------------------------------


@pytest.mark.parametrize('dtype', [F32, F64], ids=['float32', 'float64'])
def test_heads_major_attention_matches_dot_product_attention(dtype):
  b, t, h, hd = 2, 11, 2, 32  # the tiny ViT's attention shape
  qkv = normal(0, (b, t, 3, h, hd), dtype) * np.asarray(0.5, dtype)
  cot = normal(1, (b, t, h * hd), dtype)

  def run(qkv, cot):
    return [value_and_vjp(fn, cot, qkv) for fn in
            (cpu_kernels.heads_major_attention, plain_attention, reference_attention)]

  (y, dqkv), (y_plain, dqkv_plain), (y_ref, dqkv_ref) = fast_jit(run, qkv, cot)(qkv, cot)
  assert y.dtype == dqkv[0].dtype == dtype
  rho = attention_rho(logit_terms_bound(qkv[:, :, 0], qkv[:, :, 1]), t, hd, dtype)
  # Forward, elementwise: within rho sum_k p_k |v_k| (+ gamma_T of the sum in float32) of the
  # exact output for each of the two; sum_k p_k |v_k| <= max over keys of |v|.
  vmax = np.max(np.abs(f64(qkv[:, :, 2])), axis=1).reshape(b, 1, h * hd)
  assert_within(y, y_plain, 2 * (rho + gamma(t, UNIT[dtype])) * vmax)
  assert_trees_close(dqkv, dqkv_plain, ATTN_GAIN * rho)
  if dtype == F64:
    # Against the float64 softmax written out, nothing is rounded to float32: the sums are of
    # at most T + hd = 43 terms and the softmax adds ~T + 5 roundings, each of relative size
    # U64; with the 1/sqrt(hd) and the T x T products that is within 2 * 8 * 64 U64 = 1.1e-13
    # of the largest summed term, and the summed terms exceed the largest result by at most
    # a factor of 100 here (|q k| / sqrt(hd) <= S, outputs of order 1): 1e-11.
    assert_trees_close((y, dqkv), (y_ref, dqkv_ref), 1e-11)


def test_cls_only_attention_matches_row_zero():
  """Attention(cls_only=True) is row 0 of the full attention, values and gradients with
  respect to the parameters and the input, under both model.kernels settings."""
  b, t, dim, heads = 2, 11, 64, 2
  x = normal(0, (b, t, dim), F64)
  cot = normal(1, (b, 1, dim), F64)
  modules = {k: vit.Attention(dim, heads, F64, None, k) for k in vit.KERNEL_CHOICES}
  shapes = jax.eval_shape(modules['plain'].init, jax.random.PRNGKey(0), x)['params']
  rng = np.random.default_rng(2)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) / math.sqrt(s.shape[0] if len(s.shape) > 1
                                                                  else 10.0), F64), shapes)

  def run(params, x):
    out = {}
    for kernels, module in modules.items():
      for cls_only in (False, True):
        def fn(p, x, module=module, cls_only=cls_only):
          return module.apply({'params': p}, x, cls_only)[:, :1]
        out[kernels, cls_only] = value_and_vjp(fn, cot, params, x)
    return out

  out = fast_jit(run, params, x)(params, x)
  assert out['plain', True][0].shape == (b, 1, dim)
  # Every output here goes through jax.nn.dot_product_attention's float32 softmax except the
  # full 'cpu' one, so all are within the attention bound of the exact one (and each other).
  qkv = (f64(x) @ f64(params['qkv']['kernel']) + f64(params['qkv']['bias'])).reshape(
      b, t, 3, heads, dim // heads)
  tol = 2 * ATTN_GAIN * attention_rho(logit_terms_bound(qkv[:, :, 0], qkv[:, :, 1]), t,
                                      dim // heads, F64)
  ref = out['plain', False]
  for key, result in out.items():
    assert_trees_close(result, ref, tol)


# --- the whole ViT ---------------------------------------------------------------------------

IMAGE = (2, 64, 32, 3)
PATCH, STRIDE, DIM, DEPTH, HEADS = 16, 12, 64, 2, 2


def random_params(shapes, seed):
  """O(1) parameters: Dense and patch kernels N(0, 1 / fan_in) / 2, LayerNorm scales near 1,
  biases and embeddings of size 0.1 to 0.5, so that attention is far from uniform."""
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = jax.tree_util.keystr(path)
    z = rng.normal(size=s.shape)
    if name.endswith("['kernel']"):
      z = z * 0.5 / math.sqrt(int(np.prod(s.shape[:-1])))
    elif name.endswith("['scale']"):
      z = 1 + 0.1 * z
    elif name.endswith("['bias']"):
      z = 0.1 * z
    else:  # cls_token, pos_embed
      z = 0.5 * z
    return jnp.asarray(z, F64)

  return jax.tree_util.tree_map_with_path(make, shapes)


def vit_logit_bound(params) -> float:
  """A bound on sum_i |q_i k_i| / sqrt(hd) in every block, from the parameters alone.

  A block's attention sees y = scale * z + bias with z the normalised token (||z||_2 <= sqrt D),
  so ||y||_2 <= max|scale| sqrt D + ||bias||_2, and a head's query has ||q_h||_2 <=
  ||W_qh||_2 ||y||_2 + ||b_qh||_2 (likewise keys); Cauchy-Schwarz bounds the sum by
  ||q_h|| ||k_h|| / sqrt(hd).
  """
  hd = DIM // HEADS
  worst = 0.0
  for i in range(DEPTH):
    block = params[f'blocks_{i}']
    norm = block['norm1']
    y = np.max(np.abs(f64(norm['scale']))) * math.sqrt(DIM) + np.linalg.norm(f64(norm['bias']))
    w = f64(block['attn']['qkv']['kernel']).reshape(DIM, 3, HEADS, hd)
    bias = f64(block['attn']['qkv']['bias']).reshape(3, HEADS, hd)
    for head in range(HEADS):
      q, k = (np.linalg.norm(w[:, j, head], 2) * y + np.linalg.norm(bias[j, head])
              for j in (0, 1))
      worst = max(worst, q * k / math.sqrt(hd))
  return worst


@pytest.fixture(scope='module')
def vit_results(_x64):
  """(params, {kernels: ((loss, features), (param grads, image grad))}, jaxprs)."""
  grid = vit.patch_grid(IMAGE[1], IMAGE[2], PATCH, STRIDE)
  models = {k: vit.ViT(dim=DIM, depth=DEPTH, num_heads=HEADS, grid=grid, patch_size=PATCH,
                       stride=STRIDE, dtype=F64, kernels=k) for k in vit.KERNEL_CHOICES}
  images = normal(0, IMAGE, F64)
  shapes = jax.eval_shape(models['plain'].init, jax.random.PRNGKey(0), images)['params']
  params = random_params(shapes, 1)
  cot = normal(2, (IMAGE[0], DIM), F64)

  def loss(p, x, kernels):
    feat, _ = models[kernels].apply({'params': p}, x)  # the last block runs cls_only
    return jnp.sum(feat * cot), feat

  def both(p, x):
    return {k: jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x, k)
            for k in vit.KERNEL_CHOICES}

  jaxprs = {k: str(jax.make_jaxpr(loss, static_argnums=2)(params, images, k))
            for k in vit.KERNEL_CHOICES}
  return params, fast_jit(both, params, images)(params, images), jaxprs


def test_vit_cpu_kernels_match_plain(vit_results):
  params, results, jaxprs = vit_results
  # The two settings do run different code: the custom VJPs only under 'cpu'.
  for name in ('gelu', '_dense_matmul', 'heads_major_attention'):
    assert f'name={name}\n' in jaxprs['cpu'], name
  assert 'custom_vjp_call' not in jaxprs['plain']
  (cpu_loss, cpu_feat), cpu_grads = results['cpu']
  (ref_loss, ref_feat), ref_grads = results['plain']
  assert all(leaf.dtype == F64 for leaf in jax.tree.leaves((cpu_feat, cpu_grads)))
  # Float64 throughout, so the difference is that of the plain path's float32 softmax
  # (attention_rho with T = 1 + N tokens), everything else being float64 sums of at most
  # 768 terms (the patch embedding), 768 * 2 U64 = 1.7e-13 relative to the summed terms,
  # far below it. Each of the DEPTH blocks' probabilities moves by <= rho relative; to
  # first order each output and gradient moves by the sum over blocks, each with the
  # attention gain (the rest of a block, LayerNorm and MLP, is a fixed linear map of the
  # perturbation to first order, and with these O(1)-normalised weights it gains at most a
  # factor 2 from block to block): DEPTH * 2 * ATTN_GAIN * rho.
  gh, gw = vit.patch_grid(IMAGE[1], IMAGE[2], PATCH, STRIDE)
  t = 1 + gh * gw
  rho = attention_rho(vit_logit_bound(params), t, DIM // HEADS, F64)
  tol = DEPTH * 2 * ATTN_GAIN * rho
  assert tol < 1e-3  # an O(1) error in any formula cannot pass
  assert_trees_close(cpu_feat, ref_feat, tol)
  np.testing.assert_allclose(float(cpu_loss), float(ref_loss), rtol=tol)
  assert_trees_close(cpu_grads, ref_grads, tol)  # every parameter, and the image


def test_unknown_kernels_name_the_field():
  x = jnp.zeros((1, 11, 64), jnp.float32)
  image = jnp.zeros((1, 64, 32, 3), jnp.float32)
  for module, args in ((vit.Attention(64, 2, kernels='fast'), (x,)),
                       (vit.Block(64, 2, kernels='fast'), (x, False)),
                       (vit.ViT(dim=64, depth=1, num_heads=2, grid=(5, 2), patch_size=16,
                                stride=12, kernels='fast'), (image,))):
    with pytest.raises(ValueError, match=r"model\.kernels='fast'.*'plain', 'cpu'"):
      jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)
  assert vit.KERNEL_CHOICES == ('plain', 'cpu')
