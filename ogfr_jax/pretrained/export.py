"""The trained student (or teacher) backbone -> a timm-compatible safetensors file."""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping

import numpy as np

from ogfr_jax.pretrained.mapping import TIMM_BLOCK_NAMES, TIMM_TOP_NAMES, flat_tree
from ogfr_jax.pretrained.readers import GRID_KEY


def vit_to_timm(vit_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our ViT tree -> a timm `VisionTransformer` state dict (float32 numpy, contiguous).

  SIE and the part branch (JPM) have no timm counterpart and are left out.
  """
  flat = {'/'.join(k): np.asarray(v, np.float32) for k, v in flat_tree(vit_params).items()}
  inverse = {target: (src, fn) for src, (target, fn) in TIMM_TOP_NAMES.items()}
  out = {}
  for key, value in flat.items():
    m = re.match(r'^blocks_(\d+)/(.+)$', key)
    if m:
      src = next((s for s, (t, _) in TIMM_BLOCK_NAMES.items() if t == m.group(2)), None)
      if src is None:
        raise ValueError(f'{key}: no timm name for this parameter')
      out[f'blocks.{m.group(1)}.{src}'] = value.T if value.ndim == 2 else value
    elif key in inverse:
      src = inverse[key][0]
      out[src] = value.transpose(3, 2, 0, 1) if key == 'patch_embed/kernel' else value
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# Extra tensors of an export: what the ReID model adds to a timm ViT. Not timm parameters, so
# a timm user pops every 'reid.' key before load_state_dict (see tools/convert.py).
SIE_TENSOR = 'reid.sie_embed'  # [num_cameras, D]: tokens += sie_weight * table[camid]
SIE_WEIGHT_KEY = 'reid.sie_weight'
PATTERN_TENSOR = 'reid.pattern_embed_0'  # [D]: tokens += E[0], when not folded into pos_embed
EXTRA_PREFIX = 'reid.'
LOSSY_KEY = 'ogfr.lossy'


class LossyExportError(ValueError):
  """The run's features depend on parts a timm ViT cannot represent; refused unless allowed."""


def lossy_parts(config: Any, branch: str = 'student') -> list[str]:
  """The parts of `config`'s inference features of `branch` that an export cannot represent:
  with any of them a timm model built from the export computes other features than the run."""
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  m = config.model
  parts = []
  if branch == 'student' and build.student_erases(config):
    parts.append('student_erase: the occluder-token erasure before the blocks')
  if m.jpm:
    parts.append('model.jpm: the part features (JPM branch) concatenated to the CLS feature')
  if config.eval.feature != 'pre_bn':
    parts.append(f'eval.feature={config.eval.feature}: the BNNeck after the backbone')
  return parts


def check_lossless(config: Any, branch: str = 'student', allow_lossy: bool = False
                   ) -> list[str]:
  """`lossy_parts`, raising LossyExportError when there are any and `allow_lossy` is False."""
  lossy = lossy_parts(config, branch)
  if lossy and not allow_lossy:
    raise LossyExportError(
        f'the {branch} features of this run depend on parts a timm ViT cannot represent: '
        f'{"; ".join(lossy)}. A model built from the export would compute other features; '
        'pass --allow-lossy (allow_lossy=True) to write it anyway')
  return lossy


def export_timm_safetensors(params: Mapping[str, Any], config: Any, path: str,
                            branch: str = 'student', *, fold_pattern_embed: bool = True,
                            allow_lossy: bool = False) -> dict[str, str]:
  """Writes one branch's backbone as a timm-compatible `vit_*` state dict (safetensors).

  The position embedding is written at our token grid (e.g. 21x10 for 256x128 at stride 12),
  and the header metadata records grid, patch size, stride and input size. A timm user must
  build the model so that its pos_embed has that many tokens and the patch conv that stride:
      m = timm.create_model('vit_base_patch16_224', num_classes=0,
                            img_size=(gh * patch, gw * patch))   # e.g. (336, 160)
      m.patch_embed.proj.stride = (stride, stride)                 # e.g. (12, 12)
      m.patch_embed.strict_img_size = False                        # accept 256x128 inputs
      state = safetensors.torch.load_file(path)
      extras = {k: state.pop(k) for k in list(state) if k.startswith('reid.')}
      m.load_state_dict(state)
  then `m.forward_features(x)[:, 0]` on 256x128 inputs is our backbone's CLS feature, once the
  extras are added to the tokens (recipe in tools/convert.py):
  - `reid.sie_embed` [num_cameras, D] (model.sie): sie_weight * table[camid] on every token,
    with sie_weight in the metadata under `reid.sie_weight`;
  - `reid.pattern_embed_0` [D]: the student's test-time pattern embedding E[0] on every
    token, written only when it is not folded into pos_embed.
  With `fold_pattern_embed` (and model.pattern_embed) E[0], a
  constant added to every token, is folded into pos_embed instead.

  Parts of the run's inference features that a timm ViT cannot represent (`lossy_parts`: the
  student's occluder-token erasure, JPM part features, a 'soft' pattern policy, post-BN
  features) make the export refuse with `LossyExportError`, unless `allow_lossy`: then each
  is printed as a warning on stderr and listed in the metadata under `ogfr.lossy`. The file
  honours the umask, like every other output. Returns the metadata written.
  """
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  if branch not in ('student', 'teacher'):
    raise ValueError(f"branch={branch!r}: use 'student' or 'teacher'")
  names = build.backbone_names(config)
  name = 'vit' if 'vit' in names else f'{branch}_vit'
  if name not in params:
    raise ValueError(f'the parameter tree has no {name} backbone (top-level names: '
                     f'{sorted(params)}); the teacher exists only with model.teacher')
  lossy = check_lossless(config, branch, allow_lossy)
  for part in lossy:
    print(f'warning: the export leaves out {part}; its features differ from the run\'s',
          file=sys.stderr)
  tensors = vit_to_timm(params[name])
  folded = 'no'
  uses_e0 = (branch == 'student' and config.model.pattern_embed and 'pattern_embed' in params)
  if uses_e0:
    e0 = np.asarray(params['pattern_embed'], np.float32)[0]
    if fold_pattern_embed:
      tensors['pos_embed'] = tensors['pos_embed'] + e0
      folded = 'E[0] added to pos_embed'
    else:
      tensors[PATTERN_TENSOR] = np.ascontiguousarray(e0)
      folded = f'no: E[0] is {PATTERN_TENSOR}, to add to every token'
  sie = 'off'
  vit_params = params[name]
  if config.model.sie and 'sie_embed' in vit_params:
    table = np.asarray(vit_params['sie_embed'], np.float32)
    tensors[SIE_TENSOR] = np.ascontiguousarray(table)
    sie = (f'{SIE_TENSOR} [{table.shape[0]} cameras, {table.shape[1]}]: add '
           f'{SIE_WEIGHT_KEY} * table[camid] to every token')
  erase = 'no'
  if branch == 'student' and build.student_erases(config):
    erase = 'not exported'
  gh, gw = build.token_grid(config)
  dim, depth, heads = build.vit_size(config)
  metadata = {
      'format': 'pt', GRID_KEY: f'{gh}x{gw}', 'ogfr.patch_size': str(config.model.patch_size),
      'ogfr.stride': str(config.model.stride),
      'ogfr.img_size': f'{config.input.height}x{config.input.width}',
      'ogfr.timm_img_size': f'{gh * config.model.patch_size}x{gw * config.model.patch_size}',
      'ogfr.width': str(dim), 'ogfr.depth': str(depth), 'ogfr.num_heads': str(heads),
      'ogfr.branch': branch, 'ogfr.pattern_embed_folded': folded,
      'ogfr.sie': sie, 'ogfr.student_erase': erase,
      LOSSY_KEY: '; '.join(lossy) if lossy else 'no',
      # How the run turns the backbone's CLS output into its features (config.eval).
      'ogfr.eval_feature': str(config.eval.feature),
      'ogfr.eval_normalize': str(bool(config.eval.normalize)).lower(),
      'ogfr.eval_flip': str(bool(config.eval.flip)).lower(),
      'ogfr.input_mean': ','.join(str(float(v)) for v in config.input.mean),
      'ogfr.input_std': ','.join(str(float(v)) for v in config.input.std),
  }
  if SIE_TENSOR in tensors:
    metadata[SIE_WEIGHT_KEY] = repr(float(config.model.sie_weight))
  write_bytes_honouring_umask(path, save(tensors, metadata=metadata))
  return metadata


def write_bytes_honouring_umask(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically, with the permissions of any new file (0666 minus
  the umask). `safetensors.numpy.save_file` creates its files with mode 0600 instead."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
