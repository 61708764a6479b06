"""XLA:CPU formulations of the ViT's products, used with model.kernels='cpu'.

Each computes the same function as the plain flax/jax form that the ViT uses by default
(models/vit.py, kernels='plain'); they differ only by float rounding, and
tests/test_kernels.py checks values and gradients of each, and of a whole ViT, against the
plain form. They exist because XLA:CPU runs these forms faster. GPUs and TPUs run the plain
forms at full speed, and the plain form is the default, so the path accelerators take is the
one the tests take by default.

- `gelu`: exact GELU through erf (as PyTorch's nn.GELU), with a written-out backward that keeps
  only x. jax.nn.gelu(approximate=False) uses erfc, which XLA:CPU expands into a longer
  polynomial with an exp.
- `cpu_dense_dot_general`: nn.Dense's contraction (its `dot_general` argument) with the weight
  gradient dW = x^T dy computed as a plain product of an explicitly transposed operand. XLA:CPU
  runs the transposed-operand form at one half to two thirds of the speed of a row-major
  product: on a ViT-B/16 block with 211 tokens and batch 8 the four weight gradients took 1.5x
  the time of the forward's four products.
- `heads_major_attention`: softmax attention of the fused qkv projection laid out heads-major,
  with the scale on q and a written-out backward that needs no transpose of a T x T tensor. On
  a ViT-B/16 block with 211 tokens and batch 8, forward and backward take 93 ms of CPU time on
  one core against 151 ms for jax.nn.dot_product_attention.

All three work in float32, bfloat16 and float64 (the attention accumulates logits and softmax
in float32, or in float64 for float64 inputs).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), written with erf as PyTorch's nn.GELU and timm compute it.

  `jax.nn.gelu(approximate=False)` uses erfc, which XLA:CPU expands into a longer polynomial
  with an exp; erf is cheaper there and differs from it only by float rounding (it loses
  relative precision far in the negative tail, where GELU is below 1e-6 in magnitude). The
  gradient is written out (`_gelu_bwd`) so that the forward pass keeps only x for it, not the
  intermediate products that differentiating the formula would store.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(math.sqrt(0.5), x.dtype)))


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, dy):
  # The barrier keeps XLA from sharing erf(x / sqrt 2) with the forward pass, which would
  # store it as one more [B, T, 4D] array; recomputing it here is cheaper than that pass.
  x = jax.lax.optimization_barrier(x)
  cdf = 0.5 * (1.0 + jax.lax.erf(x * np.asarray(math.sqrt(0.5), x.dtype)))
  pdf = jnp.exp(-0.5 * x * x) * np.asarray(1.0 / math.sqrt(2.0 * math.pi), x.dtype)
  return (dy * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# --- Linear layers: the weight gradient on CPU -----------------------------------------------
#
# The weight gradient of y = x @ W is dW = x^T @ dy, a contraction over the token axis, which
# is the leading axis of both operands. XLA:CPU hands that "transposed" form to Eigen, which
# runs it at one half to two thirds of the speed of a plain row-major product (the forward and
# input-gradient products go to YNNPACK at full speed); on a ViT-B/16 block with 211 tokens and
# batch 8 the four weight gradients took 1.5x the time of the forward's four products.
# Transposing the smaller operand explicitly (behind an optimization barrier, so that XLA does
# not fold it back into the dot) turns dW into a plain product, at the price of one copy of
# that operand. GPUs and TPUs multiply transposed operands at full speed, so only the CPU gets
# this form (models/vit.py `dense_dot_general` with kernels='cpu').


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_matmul(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _dense_matmul_fwd(x, kernel, precision):
  return _dense_matmul(x, kernel, precision), (x, kernel)


def _dense_matmul_bwd(precision, residuals, dy):
  x, kernel = residuals
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision)
  x2 = x.reshape(-1, x.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  barrier = jax.lax.optimization_barrier
  plain = (((1,), (0,)), ((), ()))
  if x2.shape[1] <= dy2.shape[1]:
    dkernel = jax.lax.dot_general(barrier(x2.T), dy2, plain, precision=precision)
  else:  # the output side is the smaller one: dW^T = dy^T @ x, then transpose the result
    dkernel = barrier(jax.lax.dot_general(barrier(dy2.T), x2, plain, precision=precision)).T
  return dx, dkernel.astype(kernel.dtype)


_dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def cpu_dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                          preferred_element_type=None):
  """`nn.Dense`'s contraction with the CPU-friendly weight gradient (same values)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or lhs_batch
      or rhs_batch or rhs.ndim != 2 or preferred_element_type is not None):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  return _dense_matmul(lhs, rhs, precision)


def _accum(dtype):
  """The accumulation dtype of the attention logits: float32 for float32 and bfloat16 inputs
  (as jax.nn.dot_product_attention), float64 for float64 ones."""
  return jnp.promote_types(dtype, jnp.float32)


@jax.custom_vjp
def heads_major_attention(qkv: jax.Array) -> jax.Array:
  """Softmax attention of a fused projection qkv [B, T, 3, H, hd] -> [B, T, H * hd].

  The same function as `jax.nn.dot_product_attention` (logits and softmax in float32; in
  float64 for float64 inputs, which jax.nn.dot_product_attention rounds to float32), laid out
  for XLA:CPU: one transpose puts q, k and v heads-major ([B, H, T, hd]), the 1/sqrt(hd)
  scale goes on q (T x hd values) instead of on the T x T logits, and the backward pass
  (written out, `_attention_bwd`) needs no transpose of a T x T tensor and returns the
  gradient of qkv in one piece. On a ViT-B/16 block with 211 tokens and batch 8 its forward
  and backward take 93 ms of CPU time on one core against 151 ms for
  `jax.nn.dot_product_attention`.
  """
  return _attention_fwd(qkv)[0]


def _attention_fwd(qkv):
  b, t, _, h, hd = qkv.shape
  x = jnp.transpose(qkv, (2, 0, 3, 1, 4))
  q = x[0] * jnp.asarray(hd ** -0.5, qkv.dtype)
  k, v = x[1], x[2]
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=_accum(qkv.dtype))
  probs = jax.nn.softmax(logits, axis=-1).astype(qkv.dtype)
  out = jnp.einsum('bhqk,bhkd->bhqd', probs, v)
  return jnp.transpose(out, (0, 2, 1, 3)).reshape(b, t, h * hd), (q, k, v, probs, out)


def _attention_bwd(residuals, dy):
  q, k, v, probs, out = residuals
  b, h, t, hd = q.shape
  f32 = _accum(q.dtype)
  dout = jnp.transpose(dy.reshape(b, t, h, hd), (0, 2, 1, 3))
  dprobs = jnp.einsum('bhqd,bhkd->bhqk', dout, v, preferred_element_type=f32)
  # Softmax backward: sum_k P_qk dP_qk = dO_q . O_q, a T x hd product instead of a T x T one.
  rowdot = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
  dlogits = (probs.astype(f32) * (dprobs - rowdot)).astype(q.dtype)
  dq = jnp.einsum('bhqk,bhkd->bhqd', dlogits, k) * jnp.asarray(hd ** -0.5, q.dtype)
  dk = jnp.einsum('bhqk,bhqd->bhkd', dlogits, q)  # q is scaled: d(logits)/dk = scaled q
  dv = jnp.einsum('bhqk,bhqd->bhkd', probs, dout)
  return (jnp.transpose(jnp.stack([dq, dk, dv]), (1, 3, 0, 2, 4)),)


heads_major_attention.defvjp(_attention_fwd, _attention_bwd)
