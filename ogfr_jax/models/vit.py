"""Vision Transformer backbone for person re-identification (TransReID flavour) and the BNNeck head.

The backbone is split into stages that can be called on their own (`embed`, `run_blocks`,
`final_norm`, `tail`) because the teacher's purification agent acts between block L and the
rest of the network, and the reward passes re-run only the blocks after L.

Token layout everywhere: [B, 1 + N, D] with the CLS token first and N = gh * gw patch tokens in
row-major grid order.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from ogfr_jax.models import cpu_kernels

Dtype = Any

LN_EPS = 1e-6
# Linear layers, CLS and position embeddings (ViT / TransReID convention).
TRUNC_INIT = nn.initializers.truncated_normal(stddev=0.02)
# ID classifier: small weights so that the initial logits are near uniform (TransReID).
CLASSIFIER_INIT = nn.initializers.normal(stddev=0.001)
# config.model.remat: what the transformer blocks keep for the backward pass (see `remat_block`).
REMAT_CHOICES = ('none', 'dots', 'block')
KERNEL_CHOICES = ('plain', 'cpu')  # models/cpu_kernels.py
# The `camid` of images whose camera the SIE table has no row for (ViT.embed).
UNSEEN_CAMERA = 'unseen'
# Checkpoint name of the linear layers' outputs inside a block, kept by model.remat='dots'.
DENSE_OUTPUT = 'dense_output'


def patch_grid(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
  """Token grid of an overlapping patch embedding (a VALID convolution)."""
  if patch_size <= 0 or stride <= 0:
    raise ValueError(f'model.patch_size={patch_size} and model.stride={stride} must be positive')
  if height < patch_size or width < patch_size:
    raise ValueError(f'input {height}x{width} (input.height x input.width) is smaller than '
                     f'model.patch_size={patch_size}')
  return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


def resize_pos_embed(posemb, old_grid: tuple[int, int], new_grid: tuple[int, int]):
  """Bilinearly resamples a position embedding to another token grid.

  Used when importing weights trained at another resolution or stride (e.g. ImageNet 14x14 ->
  ReID 21x10). `posemb` is [1, T, D] or [T, D] with T = gh*gw (patch tokens only) or 1 + gh*gw
  (CLS first; the CLS entry is kept as is). Half-pixel centres without antialiasing, which is
  what `torch.nn.functional.interpolate(mode='bilinear', align_corners=False)` does, so imported
  TransReID checkpoints keep their behaviour.
  """
  posemb = jnp.asarray(posemb)
  squeeze = posemb.ndim == 2
  if squeeze:
    posemb = posemb[None]
  if posemb.ndim != 3:
    raise ValueError(f'position embedding must be [1, T, D] or [T, D], got {posemb.shape}')
  (oh, ow), (nh, nw) = tuple(old_grid), tuple(new_grid)
  t, d = posemb.shape[1], posemb.shape[2]
  if t == oh * ow + 1:
    cls, grid = posemb[:, :1], posemb[:, 1:]
  elif t == oh * ow:
    cls, grid = posemb[:, :0], posemb
  else:
    raise ValueError(f'position embedding has {t} tokens, which fits neither {oh}x{ow} nor '
                     f'1 + {oh}x{ow}')
  grid = grid.reshape(posemb.shape[0], oh, ow, d).astype(jnp.float32)
  grid = jax.image.resize(grid, (posemb.shape[0], nh, nw, d), method='bilinear', antialias=False)
  out = jnp.concatenate([cls.astype(jnp.float32), grid.reshape(posemb.shape[0], nh * nw, d)],
                        axis=1).astype(posemb.dtype)
  return out[0] if squeeze else out


def shift_and_shuffle(patches: jax.Array, shift: int, groups: int) -> jax.Array:
  """The JPM rearrangement: rotate patch tokens by `shift`, then interleave `groups` groups.

  Rotation moves a few tokens from the start to the end; the shuffle then reads the groups
  column-wise, so each later part mixes tokens from all over the body. If N is not a multiple of
  `groups`, the last token is repeated until it is (so every group has the same length).
  """
  b, n, d = patches.shape
  x = jnp.roll(patches, -shift, axis=1)
  pad = (-n) % groups
  if pad:
    x = jnp.concatenate([x, jnp.repeat(x[:, -1:], pad, axis=1)], axis=1)
  x = x.reshape(b, groups, (n + pad) // groups, d)
  return jnp.swapaxes(x, 1, 2).reshape(b, n + pad, d)


def dense_dot_general(kernels: str):
  """The contraction for the backbone's Dense layers: the CPU form with kernels='cpu', else
  None (flax's default, lax.dot_general)."""
  return cpu_kernels.cpu_dense_dot_general if kernels == 'cpu' else None


def activation(kernels: str):
  """Exact GELU: the erf form with its own backward for kernels='cpu', else jax.nn.gelu."""
  if kernels == 'cpu':
    return cpu_kernels.gelu
  return functools.partial(jax.nn.gelu, approximate=False)


def check_kernels(kernels: str) -> None:
  """Raises ValueError unless `kernels` (config.model.kernels) is one of KERNEL_CHOICES."""
  if kernels not in KERNEL_CHOICES:
    raise ValueError(f'model.kernels={kernels!r}: use one of {list(KERNEL_CHOICES)}')


def remat_block(block_cls, remat: str):
  """`block_cls` wrapped per config.model.remat, for activation memory against compute.

  'none': every block keeps its activations for the backward pass (fastest, most memory).
  'dots': only the outputs of the linear layers (named DENSE_OUTPUT) are kept; norms, GELU
    and attention are recomputed in the backward pass.
  'block': only each block's input is kept; the whole block forward runs again in the
    backward pass (about one more forward pass of the blocks, the least memory).
  Results are the same up to float rounding in every mode. Recomputation, for the gradient of
  4 ViT-B blocks at batch 8: 'dots' +2% FLOPs, 'block' +22% FLOPs (+18% CPU time). The memory
  saving depends on the backend's scheduler placing the recomputation in the backward pass;
  XLA:CPU (jaxlib 0.10) schedules it next to the forward computation, so on the CPU neither
  mode lowers the peak (533 MiB of temporaries in all three modes there).
  """
  if remat not in REMAT_CHOICES:
    raise ValueError(f'model.remat={remat!r}: use one of {list(REMAT_CHOICES)}')
  if remat == 'none':
    return block_cls
  policy = (jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT) if remat == 'dots'
            else None)
  # static_argnums counts self as 0: `train` (argument 2) selects drop-path and `cls_only`
  # (argument 3) the output rows; both are Python bools.
  return nn.remat(block_cls, policy=policy, static_argnums=(2, 3))


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = 'cudnn'):
  """Self-attention through cuDNN's fused kernel (NVIDIA GPUs, bfloat16/float16), [B, T, H, d].

  jax's cuDNN path refuses an odd token count when it is differentiated (its placeholder bias
  counts as a bias there, and cuDNN's biased backward needs even lengths); a ReID ViT has
  1 + gh*gw tokens, odd whenever gh*gw is even (21x10, 22x11). An odd sequence therefore gets
  one zero token appended that no query attends to (key and query lengths T through cuDNN's
  padding mask), and its output row is dropped: the other rows are those of the unpadded
  attention. `implementation='xla'` runs the same padded formulation through XLA (how the
  padding is tested on a CPU).
  """
  t = q.shape[1]
  if t % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))  # noqa: E731
  lengths = jnp.full((q.shape[0],), t, jnp.int32)
  y = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), query_seq_lengths=lengths,
                                   key_value_seq_lengths=lengths,
                                   implementation=implementation)
  return y[:, :t]


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (with bias).

  With `cls_only` only the first token (CLS) queries: the output is [B, 1, D], keys and values
  still come from every token. Same parameters, same CLS output.

  `kernels` (KERNEL_CHOICES): 'plain' runs nn.Dense and jax.nn.dot_product_attention as they
  are; 'cpu' uses the XLA:CPU formulations of models/cpu_kernels.py (the Dense weight gradient,
  and the heads-major attention when `implementation` is None or 'xla'). Same parameters and
  values either way.
  """
  dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = None  # jax.nn.dot_product_attention's: None/'xla'/'cudnn'
  kernels: str = 'plain'

  @nn.compact
  def __call__(self, x: jax.Array, cls_only: bool = False) -> jax.Array:
    check_kernels(self.kernels)
    b, t, _ = x.shape
    head_dim = self.dim // self.num_heads
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=TRUNC_INIT,
                              dot_general=dense_dot_general(self.kernels))
    qkv = checkpoint_name(dense(3 * self.dim, name='qkv')(x), DENSE_OUTPUT)
    qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
    if cls_only:  # one query row: the plain XLA form is as fast as any
      y = jax.nn.dot_product_attention(qkv[:, :1, 0], qkv[:, :, 1], qkv[:, :, 2])
      t = 1
    elif self.implementation in (None, 'xla') and self.kernels == 'cpu':
      y = cpu_kernels.heads_major_attention(qkv)
    elif self.implementation == 'cudnn':
      y = cudnn_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    else:
      y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       implementation=self.implementation)
    return checkpoint_name(dense(self.dim, name='proj')(y.reshape(b, t, self.dim)), DENSE_OUTPUT)


class Block(nn.Module):
  """Pre-norm transformer block with per-sample stochastic depth on both residual branches.

  `cls_only`: compute the output of the CLS token only ([B, 1, D]), for a last block whose
  patch-token outputs nothing reads. The CLS row attends to all tokens as usual; what is
  skipped is the attention output, projection and MLP of the patch rows (about three quarters
  of a block's FLOPs). Results and parameters are those of the full block.
  """
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  kernels: str = 'plain'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, cls_only: bool = False) -> jax.Array:
    check_kernels(self.kernels)
    # Dropout broadcast over tokens and channels drops a whole sample's branch: drop-path.
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2))
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=TRUNC_INIT,
                              dot_general=dense_dot_general(self.kernels))
    y = nn.LayerNorm(LN_EPS, dtype=self.dtype, name='norm1')(x)
    y = Attention(self.dim, self.num_heads, self.dtype, self.attention_impl, self.kernels,
                  name='attn')(y, cls_only)
    if cls_only:
      x = x[:, :1]
    x = x + drop(y, deterministic=not train)
    y = nn.LayerNorm(LN_EPS, dtype=self.dtype, name='norm2')(x)
    y = checkpoint_name(dense(int(self.dim * self.mlp_ratio), name='fc1')(y), DENSE_OUTPUT)
    y = activation(self.kernels)(y)
    y = checkpoint_name(dense(self.dim, name='fc2')(y), DENSE_OUTPUT)
    return x + drop(y, deterministic=not train)


# TransReID's jigsaw patch module: the patch tokens shifted by 5, shuffled in 2 groups and
# split into 4 parts (its SHIFT_NUM, SHUFFLE_GROUP and DEVIDE_LENGTH).
JPM_SHIFT, JPM_SHUFFLE_GROUPS, JPM_PARTS = 5, 2, 4


class ViT(nn.Module):
  """ReID ViT: overlapping patches, CLS, position + camera (SIE) embeddings, blocks, final norm.

  `grid` is the token grid the position embedding is shaped for (see `patch_grid`). With `jpm`,
  a copy of the last block and norm (`jpm_block`, `jpm_norm`) forms the TransReID part branch.
  `remat` trades activation memory for recomputation (`remat_block`), and `kernels` selects the
  formulation of the blocks' products (`Attention`, models/cpu_kernels.py); parameters and
  results depend on neither.
  """
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
  jpm_shift: int = JPM_SHIFT
  jpm_shuffle_groups: int = JPM_SHUFFLE_GROUPS
  jpm_parts: int = JPM_PARTS
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: str = 'none'
  kernels: str = 'plain'  # KERNEL_CHOICES; 'cpu': models/cpu_kernels.py, faster on XLA:CPU

  def setup(self):
    check_kernels(self.kernels)
    if self.dim % self.num_heads:
      raise ValueError(f'width {self.dim} is not divisible by {self.num_heads} heads')
    n = self.grid[0] * self.grid[1]
    self.patch_embed = nn.Conv(self.dim, (self.patch_size, self.patch_size),
                               strides=(self.stride, self.stride), padding='VALID',
                               dtype=self.dtype, name='patch_embed')
    self.cls_token = self.param('cls_token', TRUNC_INIT, (1, 1, self.dim))
    self.pos_embed = self.param('pos_embed', TRUNC_INIT, (1, 1 + n, self.dim))
    if self.sie and self.num_cameras > 0:
      self.sie_embed = self.param('sie_embed', TRUNC_INIT, (self.num_cameras, self.dim))
    rates = np.linspace(0.0, self.drop_path, self.depth)  # stochastic depth grows with depth
    block_cls = remat_block(Block, self.remat)
    self.blocks = [block_cls(self.dim, self.num_heads, self.mlp_ratio, float(rates[i]),
                             self.dtype, self.attention_impl, self.kernels)
                   for i in range(self.depth)]
    self.norm = nn.LayerNorm(LN_EPS, dtype=self.dtype)
    if self.jpm:
      if not 1 <= self.jpm_parts <= n:
        raise ValueError(f'model.jpm_parts={self.jpm_parts} must be in [1, {n}] (patch tokens)')
      if self.jpm_shuffle_groups < 1:
        raise ValueError(f'model.jpm_shuffle_groups={self.jpm_shuffle_groups} must be >= 1')
      self.jpm_block = block_cls(self.dim, self.num_heads, self.mlp_ratio, float(rates[-1]),
                                 self.dtype, self.attention_impl, self.kernels)
      self.jpm_norm = nn.LayerNorm(LN_EPS, dtype=self.dtype)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  def embed(self, image: jax.Array, camid: Optional[jax.Array] = None,
            extra: Optional[jax.Array] = None) -> jax.Array:
    """Image [B, H, W, 3] -> tokens [B, 1 + N, D] (compute dtype).

    `extra` ([B, D] or [D]) is added to every token, like SIE; the occlusion-aware student
    passes its pattern embedding here. A camera id outside [0, num_cameras) gives NaN
    features (jnp.take's fill mode), so a bad id shows up as a NaN loss instead of passing
    silently. `camid=UNSEEN_CAMERA` (a string, fixed at trace time) gives every image the
    mean of the camera embeddings: images of cameras the model never trained with.
    """
    x = self.patch_embed(image.astype(self.dtype))
    b, gh, gw, _ = x.shape
    if (gh, gw) != tuple(self.grid):
      raise ValueError(f'image {image.shape[1]}x{image.shape[2]} gives a {gh}x{gw} token grid '
                       f'but the model is built for {self.grid[0]}x{self.grid[1]} '
                       f'(config input.height/input.width, model.patch_size/model.stride)')
    x = x.reshape(b, gh * gw, self.dim)
    cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (b, 1, self.dim))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(self.dtype)
    if self.sie and self.num_cameras > 0:
      if camid is None:
        raise ValueError('model.sie is on, so camera ids are required')
      if isinstance(camid, str):
        if camid != UNSEEN_CAMERA:
          raise ValueError(f'camid={camid!r}: pass camera ids or {UNSEEN_CAMERA!r}')
        # Images from cameras the table was not trained on: the mean of its rows, the same
        # offset for every image (eval.unseen_camera='mean').
        cam = jnp.broadcast_to(jnp.mean(self.sie_embed, axis=0), (b, self.dim))
      else:
        cam = jnp.take(self.sie_embed, jnp.asarray(camid, jnp.int32), axis=0)
      x = x + (self.sie_weight * cam).astype(self.dtype)[:, None, :]
    if extra is not None:
      extra = jnp.asarray(extra)
      extra = extra[:, None, :] if extra.ndim == 2 else extra[None, None, :]
      x = x + extra.astype(self.dtype)
    return x

  def patch_pos_embed(self) -> jax.Array:
    """Position embeddings of the patch tokens, [1, N, D] float32 (for token replacement)."""
    return self.pos_embed[:, 1:]

  def run_blocks(self, tokens: jax.Array, start: int, stop: int, *, train: bool,
                 cls_only: bool = False) -> jax.Array:
    """Runs blocks [start, stop) (Python ints: the slice is static).

    cls_only: the last block of the range computes the CLS row only and the result is
    [B, 1, D] (for callers that read nothing else; see `Block`). No effect on an empty range.
    """
    if not 0 <= start <= stop <= self.depth:
      raise ValueError(f'block range [{start}, {stop}) is outside [0, {self.depth}]')
    for i in range(start, stop):
      # Positional arguments: they are static under remat.
      tokens = self.blocks[i](tokens, train, cls_only and i == stop - 1)
    return tokens

  def final_norm(self, tokens: jax.Array) -> jax.Array:
    return self.norm(tokens)

  def part_features(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    """JPM part features [B, P, D] from the tokens that enter the last block.

    The shifted and shuffled patch tokens are cut into P equal parts of N // P tokens (the
    remainder is left out), each prefixed with the CLS token and run through the part block as
    one batch of B * P sequences; each part's feature is its normalised CLS output.
    """
    b, _, d = tokens.shape
    p = self.jpm_parts
    per_part = self.num_patches // p
    mixed = shift_and_shuffle(tokens[:, 1:], self.jpm_shift, self.jpm_shuffle_groups)
    parts = mixed[:, :p * per_part].reshape(b, p, per_part, d)
    cls = jnp.broadcast_to(tokens[:, None, :1], (b, p, 1, d))
    seq = jnp.concatenate([cls, parts], axis=2).reshape(b * p, 1 + per_part, d)
    out = self.jpm_norm(self.jpm_block(seq, train, True))  # only each part's CLS is read
    return out[:, 0].reshape(b, p, d)

  def tail(self, tokens: jax.Array, start: int, *, train: bool,
           cls_only: bool = False) -> tuple[jax.Array, Optional[jax.Array]]:
    """Blocks [start, depth), final norm; returns (normalised tokens, JPM parts or None).

    cls_only: the last block computes the CLS row only, and the tokens returned are [B, 1, D].
    """
    pre_last = self.run_blocks(tokens, start, self.depth - 1, train=train)
    out = self.final_norm(self.run_blocks(pre_last, self.depth - 1, self.depth, train=train,
                                          cls_only=cls_only))
    parts = self.part_features(pre_last, train=train) if self.jpm else None
    return out, parts

  def __call__(self, image: jax.Array, camid: Optional[jax.Array] = None,
               extra: Optional[jax.Array] = None, *,
               train: bool = False) -> tuple[jax.Array, Optional[jax.Array]]:
    """Whole backbone: (CLS feature [B, D], parts [B, P, D] or None)."""
    out, parts = self.tail(self.embed(image, camid, extra), 0, train=train, cls_only=True)
    return out[:, 0], parts


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and (biased) variance over the batch axis, in float32, two-pass for stability."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=0)
  return mean, jnp.mean(jnp.square(x - mean), axis=0)


class BNNeck(nn.Module):
  """BatchNorm over the batch axis with a learnable scale and no shift (TransReID's BNNeck,
  whose bias is frozen at zero: leaving it out is the same thing).

  Variables match `nn.BatchNorm(use_bias=False)`: params/scale, batch_stats/mean and var.
  Unlike nn.BatchNorm it can normalise with given statistics (`stats`) and returns the ones it
  used, so that extra passes can be normalised exactly like the real batch without touching the
  running averages. Features may be [B, D] or [B, P, D] (per-part statistics).
  Under jit over a sharded global batch the mean covers the global batch.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               stats: Optional[tuple[jax.Array, jax.Array]] = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    x = x.astype(jnp.float32)
    shape = x.shape[1:]
    scale = self.param('scale', nn.initializers.ones, shape, jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(shape, jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(shape, jnp.float32))
    if stats is not None:
      mean, var = stats
    elif train:
      mean, var = batch_moments(x)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale
    return y, (mean, var)


class Classifier(nn.Module):
  """Bias-free linear ID classifier; [B, D] -> [B, C], or per part [B, P, D] -> [B, P, C]."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', CLASSIFIER_INIT, x.shape[1:] + (self.num_classes,),
                        jnp.float32)
    x = x.astype(jnp.float32)
    if x.ndim == 2:
      return x @ kernel
    return jnp.einsum('bpd,pdc->bpc', x, kernel)


class ReIDHead(nn.Module):
  """BNNeck + ID classifier, computed in float32."""
  num_classes: int

  def setup(self):
    self.bnneck = BNNeck()
    self.classifier = Classifier(self.num_classes)

  def __call__(self, feat: jax.Array, *, train: bool) -> dict[str, Any]:
    """Returns bn_feat, logits and the normalisation statistics that were used."""
    bn_feat, stats = self.bnneck(feat, train=train)
    return {'bn_feat': bn_feat, 'logits': self.classifier(bn_feat), 'stats': stats}

  def logits_with_stats(self, feat: jax.Array, stats: tuple[jax.Array, jax.Array]) -> jax.Array:
    bn_feat, _ = self.bnneck(feat, train=False, stats=stats)
    return self.classifier(bn_feat)
