"""The compute dtype and attention kernel of a run, chosen from the backend it runs on.

config.model.dtype and config.model.attention_impl accept 'auto', resolved when the model is
built (`models.build`), i.e. on the backend the run starts on:
- dtype: bfloat16 on GPUs and TPUs (their matrix units run bfloat16 at 2x-16x the float32
  rate, and activations take half the memory), float32 on a CPU. Parameters, optimizer state,
  the losses and the gradient norm stay float32 whatever the compute dtype.
- attention: cuDNN's fused (flash) attention on NVIDIA GPUs when the compute dtype is
  bfloat16 or float16 and the head width is one cuDNN takes (a multiple of 8, at most 128);
  XLA's attention everywhere else. The fused kernel never stores the [T, T] attention
  weights, which is most of a ViT block's activation memory at ReID token counts.

config.json keeps 'auto', so a run resumed on another backend resolves again there; the header
names what was chosen. An explicit value overrides: --config.model.dtype=float32,
--config.model.attention_impl=xla.
"""

from __future__ import annotations

from typing import Optional

import ml_collections

AUTO = 'auto'
# Platform (jax.export's names; 'gpu' is read as 'cuda') -> compute dtype under 'auto'.
AUTO_DTYPE = {'cpu': 'float32', 'cuda': 'bfloat16', 'rocm': 'bfloat16', 'tpu': 'bfloat16'}
# dtypes cuDNN's fused attention takes (jax.nn.dot_product_attention(implementation='cudnn')).
CUDNN_DTYPES = ('bfloat16', 'float16')
CUDNN_MAX_HEAD_DIM = 128  # pre-Hopper limit of jax's cuDNN path; Hopper takes 256


def current_platform() -> str:
  """The platform this process computes on, in jax.export's names (cpu, cuda, rocm, tpu)."""
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  if backend != 'gpu':
    return backend
  version = str(getattr(jax.devices()[0].client, 'platform_version', '')).lower()
  return 'rocm' if 'rocm' in version else 'cuda'


def _platform(platform: Optional[str]) -> str:
  platform = current_platform() if platform is None else platform
  return 'cuda' if platform == 'gpu' else platform


def compute_dtype(model: ml_collections.ConfigDict, platform: Optional[str] = None) -> str:
  """config.model.dtype with 'auto' resolved for `platform` (default: this process's)."""
  if model.dtype != AUTO:
    return model.dtype
  return AUTO_DTYPE.get(_platform(platform), 'float32')


def cudnn_takes(dtype: str, head_dim: int) -> bool:
  """Whether jax's cuDNN attention accepts this compute dtype and head width."""
  return dtype in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM


def attention_impl(model: ml_collections.ConfigDict, head_dim: int,
                   platform: Optional[str] = None) -> str:
  """config.model.attention_impl with 'auto' resolved for `platform`: 'cudnn' on CUDA where
  cuDNN takes the dtype and head width, else 'xla'."""
  if model.attention_impl != AUTO:
    return model.attention_impl
  platform = _platform(platform)
  return ('cudnn' if platform == 'cuda'
          and cudnn_takes(compute_dtype(model, platform), head_dim) else 'xla')


def resolve(config: ml_collections.ConfigDict,
            platform: Optional[str] = None) -> ml_collections.ConfigDict:
  """A copy of `config` with model.dtype and model.attention_impl resolved for `platform`
  (default: this process's). A config without 'auto' is returned as it is."""
  if AUTO not in (config.model.dtype, config.model.attention_impl):
    return config
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  dim, _, heads = build.vit_size(config)
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.model.attention_impl = attention_impl(config.model, dim // heads, platform)
    resolved.model.dtype = compute_dtype(config.model, platform)
  return resolved


def describe(config: ml_collections.ConfigDict, platform: Optional[str] = None) -> str:
  """One header line: compute dtype, attention and remat, each marked when chosen by 'auto'."""
  r = resolve(config, platform).model
  auto = lambda field: ' (auto)' if config.model[field] == AUTO else ''  # noqa: E731
  return (f'{r.dtype} compute{auto("dtype")}, float32 parameters and optimizer state; '
          f'attention {r.attention_impl}{auto("attention_impl")}; remat {r.remat}')
