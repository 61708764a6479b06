"""Pretrained ViT tensors -> the OGFR backbones: name mapping, position-embedding resampling,
and the import into a parameter tree with its report.

Name mapping, whatever the file: each source naming is first turned into our ViT layout (flat
keys such as 'blocks_3/attn/qkv/kernel', Flax kernels [in, out], conv kernels HWIO, q/k/v fused
in the (3, heads, head_dim) order of `models.vit.Attention`), then matched against the target
shapes. The position embedding is resampled to our token grid (bilinear, half-pixel centres,
no antialiasing: what TransReID does with `F.interpolate(mode='bilinear')`), its CLS entry kept.
Everything that was not a plain copy (missing, unexpected, resampled, copied, kept) is listed in
one table (`ImportReport.table()`); a tensor whose shape cannot be mapped raises ValueError
naming the source key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
from absl import logging

from ogfr_jax import source_weights
from ogfr_jax.pretrained.readers import Checkpoint, GRID_KEY, read_checkpoint


# ---------------------------------------------------------------------------------------------
# Source names -> our ViT layout


@dataclasses.dataclass
class _Entry:
  value: np.ndarray  # already in our layout
  source: str  # the source key(s) it came from
  source_shape: tuple
  # For pos_embed: whether the file's naming says it has a CLS entry (None: infer from size).
  has_cls: Optional[bool] = None


def _t(key: str, x: np.ndarray) -> np.ndarray:
  if x.ndim != 2:
    raise ValueError(f'{key}: expected a 2-D linear weight, got shape {x.shape}')
  return x.T


def _oihw_to_hwio(key: str, x: np.ndarray) -> np.ndarray:
  if x.ndim != 4:
    raise ValueError(f'{key}: expected a 4-D conv weight [out, in, h, w], got shape {x.shape}')
  return x.transpose(2, 3, 1, 0)


def _same(key: str, x: np.ndarray) -> np.ndarray:
  del key
  return x


TIMM_BLOCK_NAMES = {
    'norm1.weight': ('norm1/scale', _same), 'norm1.bias': ('norm1/bias', _same),
    'attn.qkv.weight': ('attn/qkv/kernel', _t), 'attn.qkv.bias': ('attn/qkv/bias', _same),
    'attn.proj.weight': ('attn/proj/kernel', _t), 'attn.proj.bias': ('attn/proj/bias', _same),
    'norm2.weight': ('norm2/scale', _same), 'norm2.bias': ('norm2/bias', _same),
    'mlp.fc1.weight': ('fc1/kernel', _t), 'mlp.fc1.bias': ('fc1/bias', _same),
    'mlp.fc2.weight': ('fc2/kernel', _t), 'mlp.fc2.bias': ('fc2/bias', _same),
}
TIMM_TOP_NAMES = {
    'patch_embed.proj.weight': ('patch_embed/kernel', _oihw_to_hwio),
    'patch_embed.proj.bias': ('patch_embed/bias', _same),
    'cls_token': ('cls_token', _same), 'pos_embed': ('pos_embed', _same),
    'norm.weight': ('norm/scale', _same), 'norm.bias': ('norm/bias', _same),
}
_NORM = {'weight': 'scale', 'bias': 'bias'}
# Source keys that are known not to belong to a ReID backbone, and why.
_HEAD_NOTES = (
    (re.compile(r'^(classifier|bottleneck)(_\d+)?\.'), 'ReID head (TransReID): skipped'),
    (re.compile(r'^(head|head_dist|fc|fc_norm|pre_logits|MAPHead_0)[._/]'),
     'classification head: skipped'),
    (re.compile(r'^sie_embed$'), 'camera embedding: task-specific, not imported'),
    (re.compile(r'^dist_token$'), 'distillation token: not used'),
    # The extra tensors of our own timm export (SIE_TENSOR, PATTERN_TENSOR below).
    (re.compile(r'^reid\.sie_embed$'),
     'camera embedding of an ogfr_jax export: task-specific, not imported'),
    (re.compile(r'^reid\.pattern_embed_0$'),
     "student pattern embedding E[0] of an ogfr_jax export: not imported (this run's pattern "
     'embeddings are trained from their own start)'),
    (re.compile(r'^reid\.'), 'ReID extra of an ogfr_jax export: not imported'),
)


def _note_for(key: str) -> str:
  for pattern, note in _HEAD_NOTES:
    if pattern.search(key):
      return note
  return 'not used by our ViT'


def _timm_entries(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, _Entry],
                                                               dict[str, str], str]:
  """timm / TransReID names -> (our entries, unused source key -> note, prefix)."""
  anchors = [k for k in tensors if k.endswith('patch_embed.proj.weight')]
  prefix = min(anchors, key=len)[:-len('patch_embed.proj.weight')]
  outer = prefix[:-len('base.')] if prefix.endswith('base.') else prefix
  entries: dict[str, _Entry] = {}
  unused: dict[str, str] = {}
  branch: dict[str, tuple[str, str]] = {}  # TransReID JPM branches, resolved after depth
  depth = 0
  for key, value in tensors.items():
    if key.startswith(prefix):
      rest = key[len(prefix):]
      if rest in TIMM_TOP_NAMES:
        target, fn = TIMM_TOP_NAMES[rest]
        entries[target] = _Entry(fn(key, value), key, value.shape)
        continue
      m = re.match(r'^blocks\.(\d+)\.(.+)$', rest)
      if m and m.group(2) in TIMM_BLOCK_NAMES:
        target, fn = TIMM_BLOCK_NAMES[m.group(2)]
        depth = max(depth, int(m.group(1)) + 1)
        entries[f'blocks_{m.group(1)}/{target}'] = _Entry(fn(key, value), key, value.shape)
        continue
    if key.startswith(outer):
      # TransReID with JPM keeps the trained last block and norm in b1, the part branch in b2.
      m = re.match(r'^(b1|b2)\.(0\.(.+)|1\.(weight|bias))$', key[len(outer):])
      if m and (m.group(4) or m.group(3) in TIMM_BLOCK_NAMES):
        branch[key] = (m.group(1), m.group(3) or m.group(4))
        continue
      unused[key] = _note_for(key[len(outer):] if not key.startswith(prefix)
                              else key[len(prefix):])
      continue
    unused[key] = _note_for(key)
  for key, (name, rest) in branch.items():
    value = tensors[key]
    if rest in _NORM:
      target, fn = f"{'norm' if name == 'b1' else 'jpm_norm'}/{_NORM[rest]}", _same
    else:
      sub, fn = TIMM_BLOCK_NAMES[rest]
      target = f"{f'blocks_{depth - 1}' if name == 'b1' else 'jpm_block'}/{sub}"
    if name == 'b1' and target in entries:
      unused[entries[target].source] = f'superseded by {key} (TransReID global branch)'
    entries[target] = _Entry(fn(key, value), key, value.shape)
  return entries, unused, prefix


_JAX_PREFIXES = ('', 'opt/target/', 'params/', 'params/img/')


def _unstack_scanned(tensors: Mapping[str, np.ndarray], prefix: str
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """big_vision with scan=True stores one 'encoderblock' with a leading depth axis."""
  out, origin = {}, {}
  stacked = f'{prefix}Transformer/encoderblock/'
  for key, value in tensors.items():
    if key.startswith(stacked):
      for i in range(value.shape[0]):
        new = f'{prefix}Transformer/encoderblock_{i}/{key[len(stacked):]}'
        out[new], origin[new] = value[i], f'{key}[{i}]'
    else:
      out[key], origin[key] = value, key
  return out, origin


def _jax_entries(tensors: Mapping[str, np.ndarray], num_heads: Optional[int]
                 ) -> tuple[dict[str, _Entry], dict[str, str], str]:
  """vision_transformer / big_vision names -> (our entries, unused key -> note, prefix)."""
  prefix = next((p for p in _JAX_PREFIXES if f'{p}embedding/kernel' in tensors), None)
  if prefix is None:
    prefix = min((k for k in tensors if k.endswith('/embedding/kernel')), key=len)[
        :-len('embedding/kernel')]
  tensors, origin = _unstack_scanned(tensors, prefix)
  used: set[str] = set()
  entries: dict[str, _Entry] = {}

  def take(target: str, keys: list[str], fn: Callable[[list[np.ndarray]], np.ndarray]) -> None:
    if all(k in tensors for k in keys):
      values = [tensors[k] for k in keys]
      src = ' + '.join(origin[k] for k in keys)
      entries[target] = _Entry(fn(values), src, tuple(values[0].shape))
      used.update(keys)

  def conv(vs):
    if vs[0].ndim != 4:
      raise ValueError(f'{origin[f"{prefix}embedding/kernel"]}: expected a 4-D HWIO kernel, '
                       f'got shape {vs[0].shape}')
    return vs[0]

  take('patch_embed/kernel', [f'{prefix}embedding/kernel'], conv)
  take('patch_embed/bias', [f'{prefix}embedding/bias'], lambda vs: vs[0])
  take('cls_token', [f'{prefix}cls'], lambda vs: vs[0])
  # vision_transformer adds positions after prepending CLS; big_vision before (no CLS entry).
  for pos, has_cls in ((f'{prefix}Transformer/posembed_input/pos_embedding', True),
                       (f'{prefix}pos_embedding', False)):
    if pos in tensors:
      take('pos_embed', [pos], lambda vs: vs[0])
      entries['pos_embed'].has_cls = has_cls
  for p in ('scale', 'bias'):
    take(f'norm/{p}', [f'{prefix}Transformer/encoder_norm/{p}'], lambda vs: vs[0])

  block_ids = sorted({int(m.group(1)) for k in tensors
                      if (m := re.match(rf'^{re.escape(prefix)}Transformer/encoderblock_(\d+)/',
                                        k))})
  for i in block_ids:
    bp = f'{prefix}Transformer/encoderblock_{i}/'
    # vision_transformer numbers the sub-modules in call order (LN_0, MHA_1, LN_2, Mlp_3);
    # big_vision numbers them per type (LN_0, MHA_0, LN_1, Mlp_0).
    vt = f'{bp}MultiHeadDotProductAttention_1/query/kernel' in tensors
    mha = f'{bp}MultiHeadDotProductAttention_{1 if vt else 0}/'
    ln2 = f'{bp}LayerNorm_{2 if vt else 1}/'
    mlp = f'{bp}MlpBlock_{3 if vt else 0}/'
    tp = f'blocks_{i}/'
    for p in ('scale', 'bias'):
      take(f'{tp}norm1/{p}', [f'{bp}LayerNorm_0/{p}'], lambda vs: vs[0])
      take(f'{tp}norm2/{p}', [f'{ln2}{p}'], lambda vs: vs[0])
    qkv = [f'{mha}{n}/kernel' for n in ('query', 'key', 'value')]
    if qkv[0] in tensors:
      if tensors[qkv[0]].ndim != 3:
        raise ValueError(f'{origin[qkv[0]]}: expected [width, heads, head_dim], got shape '
                         f'{tensors[qkv[0]].shape}')
      heads = tensors[qkv[0]].shape[1]
      if num_heads is not None and heads != num_heads:
        raise ValueError(f'{origin[qkv[0]]}: the checkpoint has {heads} attention heads but the '
                         f'model has {num_heads} (config.model.size)')
    take(f'{tp}attn/qkv/kernel', qkv,
         lambda vs: np.concatenate([v.reshape(v.shape[0], -1) for v in vs], axis=1))
    take(f'{tp}attn/qkv/bias', [f'{mha}{n}/bias' for n in ('query', 'key', 'value')],
         lambda vs: np.concatenate([v.reshape(-1) for v in vs]))

    def out_kernel(vs, key=f'{mha}out/kernel'):
      if vs[0].ndim != 3:
        raise ValueError(f'{origin[key]}: expected [heads, head_dim, width], got shape '
                         f'{vs[0].shape}')
      return vs[0].reshape(-1, vs[0].shape[-1])

    take(f'{tp}attn/proj/kernel', [f'{mha}out/kernel'], out_kernel)
    take(f'{tp}attn/proj/bias', [f'{mha}out/bias'], lambda vs: vs[0])
    for r, name in ((0, 'fc1'), (1, 'fc2')):
      for p in ('kernel', 'bias'):
        take(f'{tp}{name}/{p}', [f'{mlp}Dense_{r}/{p}'], lambda vs: vs[0])
  unused = {}
  for key in tensors:
    if key not in used:
      unused[origin[key]] = _note_for(key[len(prefix):] if key.startswith(prefix) else key)
  return entries, unused, prefix


def _own_entries(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, _Entry],
                                                              dict[str, str], str]:
  entries = {k: _Entry(v, k, v.shape) for k, v in tensors.items() if k != 'sie_embed'}
  unused = {'sie_embed': _note_for('sie_embed')} if 'sie_embed' in tensors else {}
  return entries, unused, ''


def to_vit_layout(tensors: Mapping[str, np.ndarray], *, num_heads: Optional[int] = None,
                  path: str = '') -> tuple[dict[str, _Entry], dict[str, str], str]:
  """Recognises the naming of `tensors` and returns (entries in our layout, unused keys with a
  note, a description of the naming)."""
  if any(k.endswith('patch_embed.proj.weight') for k in tensors):
    entries, unused, prefix = _timm_entries(tensors)
    naming = 'timm/TransReID names'
  elif any(k == 'embedding/kernel' or k.endswith('/embedding/kernel') for k in tensors):
    entries, unused, prefix = _jax_entries(tensors, num_heads)
    naming = 'JAX ViT names (vision_transformer / big_vision)'
  elif 'patch_embed/kernel' in tensors:
    entries, unused, prefix = _own_entries(tensors)
    naming = 'ogfr_jax ViT names'
  else:
    raise ValueError(f'{path or "checkpoint"} holds no ViT weights we recognise (looked for '
                     f'patch_embed.proj.weight, embedding/kernel or patch_embed/kernel); its '
                     f'first keys are {sorted(tensors)[:10]}')
  if prefix:
    naming += f' under {prefix!r}'
  return entries, unused, naming


# ---------------------------------------------------------------------------------------------
# Position embeddings


def parse_grid(text: str) -> tuple[int, int]:
  m = re.fullmatch(r'\s*(\d+)\s*x\s*(\d+)\s*', str(text))
  if not m:
    raise ValueError(f'grid {text!r}: expected "HxW", e.g. "21x10"')
  return int(m.group(1)), int(m.group(2))


def source_pos_grid(num_tokens: int, target_grid: tuple[int, int], key: str,
                    declared: Optional[tuple[int, int]] = None,
                    has_cls: Optional[bool] = None) -> tuple[tuple[int, int], bool]:
  """(grid, has_cls) of a pretrained position embedding with `num_tokens` entries.

  Whether there is a CLS entry comes from the naming when it tells (vision_transformer: yes,
  big_vision: no, since big_vision adds positions before prepending CLS); otherwise from the
  count. A grid declared by the file (our exports) or by the caller wins; otherwise a count
  that matches the target grid is taken as that grid, and any other count must be a square
  (ImageNet checkpoints are square).
  """
  n_target = target_grid[0] * target_grid[1]
  options = [(num_tokens - 1, True), (num_tokens, False)]
  if has_cls is not None:
    options = [o for o in options if o[1] == has_cls]
  if declared is not None:
    gh, gw = declared
    for n, cls in options:
      if n == gh * gw:
        return (gh, gw), cls
    raise ValueError(f'{key}: {num_tokens} position tokens do not fit the declared grid '
                     f'{gh}x{gw}')
  for n, cls in options:
    if n == n_target:
      return tuple(target_grid), cls
  for n, cls in options:
    side = math.isqrt(max(n, 0))
    if n > 0 and side * side == n:
      return (side, side), cls
  raise ValueError(f'{key}: cannot tell the token grid of a position embedding with '
                   f'{num_tokens} tokens (not square and not the model grid '
                   f'{target_grid[0]}x{target_grid[1]}); pass source_grid=(gh, gw)')


def resample_pos_embed(posemb: np.ndarray, old_grid: tuple[int, int], has_cls: bool,
                       new_grid: tuple[int, int]) -> np.ndarray:
  """[1, T, D] -> [1, 1 + new N, D] in float32; CLS kept (zeros when the source has none).

  Uses `models.vit.resize_pos_embed` (jax.image.resize, half-pixel bilinear, no antialias,
  which equals torch's F.interpolate(mode='bilinear', align_corners=False)), pinned to the
  host CPU so that importing never takes accelerator memory.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import vit as vit_lib  # pylint: disable=g-import-not-at-top
  posemb = np.asarray(posemb, np.float32).reshape(1, -1, posemb.shape[-1])
  if not has_cls:
    posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  if tuple(old_grid) == tuple(new_grid):
    return posemb
  with jax.default_device(jax.devices('cpu')[0]):
    return np.asarray(vit_lib.resize_pos_embed(posemb, old_grid, new_grid), np.float32)


# ---------------------------------------------------------------------------------------------
# The report


STATUSES = ('loaded', 'resampled', 'copied', 'missing', 'unexpected', 'kept')


@dataclasses.dataclass
class Row:
  key: str  # the source key, or our parameter path when nothing in the file maps to it
  status: str  # one of STATUSES
  source_shape: Optional[tuple]
  target_shape: Optional[tuple]
  note: str = ''


@dataclasses.dataclass
class ImportReport:
  """What an import did, one row per tensor; `table()` prints everything but plain copies."""
  path: str
  fmt: str
  naming: str
  backbones: tuple[str, ...]
  rows: list[Row]
  note: str = ''

  def count(self, status: str) -> int:
    return sum(r.status == status for r in self.rows)

  def table(self, include_loaded: bool = False) -> str:
    """The report as text; `include_loaded=False` leaves out plain copies and folds the
    part-branch copies into one line."""
    rows = [r for r in self.rows if include_loaded or r.status not in ('loaded', 'copied')]
    copied = self.count('copied')
    if copied and not include_loaded:
      rows.insert(0, Row('jpm_block/*, jpm_norm/*', 'copied', None, None,
                         f'{copied} tensors from the last block and the final norm (the part '
                         f'branch starts as their copy)'))
    shape = lambda s: '-' if s is None else 'x'.join(map(str, s)) or 'scalar'  # noqa: E731
    cells = [('key', 'status', 'source shape', 'target shape', 'note')] + [
        (r.key, r.status, shape(r.source_shape), shape(r.target_shape), r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [' | '.join(c[i].ljust(widths[i]) for i in range(4)) + ' | ' + c[4]
             for c in cells]
    lines.insert(1, '-+-'.join('-' * w for w in widths) + '-+-' + '-' * 4)
    counts = ', '.join(f'{self.count(s)} {s}' for s in STATUSES if self.count(s))
    head = (f'pretrained weights {self.path} ({self.fmt}, {self.naming}'
            f'{"; " + self.note if self.note else ""}) -> {", ".join(self.backbones)}: {counts}')
    return head + ('\n' + '\n'.join(lines) if rows else '')

  def __str__(self) -> str:
    return self.table()


# ---------------------------------------------------------------------------------------------
# Mapping onto one ViT


def _block_ids(keys: Iterable[str]) -> list[int]:
  return sorted({int(m.group(1)) for k in keys if (m := re.match(r'^blocks_(\d+)/', k))})


def map_vit(checkpoint: Checkpoint, target: Mapping[str, Any], *, grid: tuple[int, int],
            num_heads: Optional[int] = None, source_grid: Optional[tuple[int, int]] = None
            ) -> tuple[dict[str, np.ndarray], list[Row], str]:
  """Maps a checkpoint onto one ViT given as flat {'blocks_0/attn/qkv/kernel': array-like}.

  Returns (new values for the keys that were filled, report rows, naming). Values are numpy
  arrays of the target dtype. Raises ValueError naming the source key for a shape that cannot
  be mapped.
  """
  entries, unused, naming = to_vit_layout(checkpoint.tensors, num_heads=num_heads,
                                          path=checkpoint.path)
  if source_grid is None and GRID_KEY in checkpoint.metadata:
    source_grid = parse_grid(checkpoint.metadata[GRID_KEY])
  out: dict[str, np.ndarray] = {}
  rows: list[Row] = []
  consumed: set[str] = set()
  last = max(_block_ids(target), default=0)
  for key in sorted(target, key=_param_order):
    tshape = tuple(target[key].shape)
    dtype = np.dtype(target[key].dtype)
    if key == 'sie_embed':
      rows.append(Row(key, 'kept', None, tshape, 'camera embedding: task-specific, kept'))
      continue
    entry = entries.get(key)
    if entry is None and key.startswith(('jpm_block/', 'jpm_norm/')):
      # TransReID starts the part branch as a copy of the last block and the final norm.
      origin = (f'blocks_{last}/' if key.startswith('jpm_block/') else 'norm/') + \
          key.split('/', 1)[1]
      if origin in entries:
        src = entries[origin]
        _check_shape(src, key, tshape)
        out[key] = np.array(src.value, dtype=dtype)
        rows.append(Row(src.source, 'copied', src.source_shape, tshape,
                        f'-> {key} (part branch starts as the last block / norm)'))
        continue
    if entry is None:
      rows.append(Row(key, 'missing', None, tshape, 'not in the file: kept at initialisation'))
      continue
    consumed.add(key)
    if key == 'pos_embed':
      value = entry.value
      if value.ndim not in (2, 3) or value.shape[-1] != tshape[-1] or (
          value.ndim == 3 and value.shape[0] != 1):
        raise ValueError(f'{entry.source}: position embedding of shape {entry.source_shape} '
                         f'cannot be mapped to pos_embed {tshape}')
      old, has_cls = source_pos_grid(value.shape[-2], grid, entry.source, source_grid,
                                     entry.has_cls)
      value = resample_pos_embed(value, old, has_cls, grid)
      if tuple(old) != tuple(grid) or not has_cls:
        note = (f'grid {old[0]}x{old[1]} -> {grid[0]}x{grid[1]} (bilinear)'
                if tuple(old) != tuple(grid) else 'same grid')
        if not has_cls:
          note += '; the file has no CLS position: zeros'
        rows.append(Row(entry.source, 'resampled', entry.source_shape, tshape, note))
      else:
        rows.append(Row(entry.source, 'loaded', entry.source_shape, tshape))
      out[key] = value.astype(dtype)
      continue
    _check_shape(entry, key, tshape)
    out[key] = np.array(entry.value, dtype=dtype)
    rows.append(Row(entry.source, 'loaded', entry.source_shape, tshape))
  for key in sorted(set(entries) - consumed, key=_param_order):
    if key.startswith(('jpm_block/', 'jpm_norm/')) and key not in target:
      note = 'part branch (JPM): the model has none'
    else:
      note = f'no {key} in the model'
    rows.append(Row(entries[key].source, 'unexpected', entries[key].source_shape, None, note))
  for key, note in sorted(unused.items()):
    rows.append(Row(key, 'unexpected', _shape_of(checkpoint.tensors, key), None, note))
  if not any(r.status in ('loaded', 'resampled') for r in rows):
    raise ValueError(f'{checkpoint.path}: no tensor matched the model ({naming})')
  return out, rows, naming


def _shape_of(tensors: Mapping[str, np.ndarray], key: str) -> Optional[tuple]:
  m = re.match(r'^(.*)\[(\d+)\]$', key)
  if key in tensors:
    return tuple(tensors[key].shape)
  if m and m.group(1) in tensors:
    return tuple(tensors[m.group(1)].shape[1:])
  return None


def _param_order(key: str) -> tuple:
  """Model order: embeddings, blocks by number, norm, part branch."""
  m = re.match(r'^blocks_(\d+)/(.*)$', key)
  if m:
    return (1, int(m.group(1)), m.group(2))
  group = {'patch_embed': 0, 'cls_token': 0, 'pos_embed': 0, 'sie_embed': 0}.get(
      key.split('/')[0], 2)
  return (group, 0, key)


def _check_shape(entry: _Entry, key: str, tshape: tuple) -> None:
  shape = tuple(entry.value.shape)
  if shape != tshape:
    converted = f' (in our layout {shape})' if shape != tuple(entry.source_shape) else ''
    raise ValueError(f'{entry.source}: shape {tuple(entry.source_shape)}{converted} cannot be '
                     f'mapped to the model\'s {key} of shape {tshape} (different width, patch '
                     f'size or mlp ratio?)')


# ---------------------------------------------------------------------------------------------
# OGFR parameter trees


def flat_tree(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(dict(tree))


def unflat_tree(flat: Mapping[tuple[str, ...], Any], like: Any) -> Any:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top
  tree = traverse_util.unflatten_dict(dict(flat))
  return frozen_dict.freeze(tree) if isinstance(like, frozen_dict.FrozenDict) else tree


def load_vit(vit_params: Mapping[str, Any], checkpoint: Checkpoint | str, *,
             grid: tuple[int, int], num_heads: Optional[int] = None, fmt: str = 'auto',
             source_grid: Optional[tuple[int, int]] = None) -> tuple[Any, ImportReport]:
  """Fills one ViT parameter tree (as `models.vit.ViT` creates it) from a checkpoint."""
  if isinstance(checkpoint, str):
    checkpoint = read_checkpoint(checkpoint, fmt)
  flat = {'/'.join(k): v for k, v in flat_tree(vit_params).items()}
  values, rows, naming = map_vit(checkpoint, flat, grid=grid, num_heads=num_heads,
                                 source_grid=source_grid)
  new = {tuple(k.split('/')): values.get(k, v) for k, v in flat.items()}
  report = ImportReport(checkpoint.path, checkpoint.fmt, naming, ('vit',), rows,
                        checkpoint.note)
  return unflat_tree(new, vit_params), report


def load_backbone(params: Mapping[str, Any], path: str, config: Any, *, fmt: str = 'auto',
                  source_grid: Optional[tuple[int, int]] = None) -> tuple[Any, ImportReport]:
  """Loads pretrained ViT weights into every backbone of an OGFR parameter tree.

  `params` is the 'params' collection of `models.ogfr.OGFR` (numpy or jax leaves, or
  jax.ShapeDtypeStruct leaves of an abstract state). The backbones (`teacher_vit` and
  `student_vit`, or the shared `vit`; and `occluder_vit`, the blocks it holds) are filled from
  the file; heads, SIE, pattern embeddings,
  FEPM and the agent are returned untouched. The result has the same tree structure and leaf
  dtypes; filled leaves are numpy arrays (shared between the backbones, which is safe because
  JAX never writes into them). The report is logged.

  With a sharded train state, load into the abstract params and place only the filled leaves
  (every process reads the file, so this also works on several hosts):
      loaded, _ = load_backbone(abstract.params, path, config)
      params = jax.tree.map(
          lambda new, old, s: jax.device_put(new, s) if isinstance(new, np.ndarray) else old,
          loaded, state.params, shardings.params)
  """
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  checkpoint = read_checkpoint(path, fmt)
  names = build.backbone_names(config)
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f'the parameter tree has no {missing} (top-level names: {sorted(params)}); '
                     f'was it built from this config (model.teacher)?')
  grid = build.token_grid(config)
  heads = build.vit_size(config)[2]
  flat = flat_tree(params)
  subs = {name: {'/'.join(k[1:]): v for k, v in flat.items() if k[0] == name} for name in names}
  first = subs[names[0]]
  values, rows, naming = map_vit(checkpoint, first, grid=grid, num_heads=heads,
                                 source_grid=source_grid)
  full_layout = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in first.items()}
  for name in names:
    layout = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in subs[name].items()}
    # The student's occluder classifier holds only the first blocks of a backbone.
    partial = name == 'occluder_vit'
    if (layout != full_layout and not partial) or any(
        full_layout.get(k) != v for k, v in layout.items()):
      raise ValueError(f'backbones {names[0]} and {name} differ in structure; they are built '
                       f'from one config and should not')
    for key, value in values.items():
      if key in layout:
        flat[(name,) + tuple(key.split('/'))] = value
  report = ImportReport(checkpoint.path, checkpoint.fmt, naming, tuple(names), rows,
                        checkpoint.note)
  log_report(report)
  return unflat_tree(flat, params), report


def load_from_config(params: Mapping[str, Any], config: Any
                     ) -> tuple[Any, Optional[ImportReport]]:
  """`load_backbone` with config.init_from / config.init_format; a no-op when init_from is ''."""
  if not config.init_from:
    return params, None
  return load_backbone(params, config.init_from, config, fmt=config.init_format)


def log_report(report: ImportReport) -> None:
  logging.info('%s', report.table())
  odd = [r for r in report.rows if r.status == 'missing' or (
      r.status == 'unexpected' and not r.note.endswith(('skipped', 'not imported')))]
  if odd:
    logging.warning('%d backbone tensors were missing from or unexpected in %s: see the table',
                    len(odd), report.path)


# Backbone sizes whose published figures assume ImageNet weights; from random init they score
# a small fraction of them, so the run header warns.
PRETRAINED_SIZES = ('base', 'large')


def header_lines(report: Optional[ImportReport], config: Any) -> list[str]:
  """The run header's line naming the backbone weights, and a warning for a base or large ViT
  that starts from random initialisation.

  `report` is the import of this invocation (None when nothing was imported: random init, or
  a resumed run whose weights come from its checkpoint).
  """
  if report is not None:
    loaded = report.count('loaded') + report.count('copied')
    counts = (f'{loaded} loaded, {report.count("resampled")} resampled, '
              f'{report.count("unexpected")} skipped')
    if report.count('missing'):
      counts += f', {report.count("missing")} missing (kept at initialisation)'
    source = (f'{config.init_from} (cached: {report.path})'
              if source_weights.is_named(config.init_from) else report.path)
    return [f'weights: {source} ({report.fmt}, {report.naming}): {counts}']
  if config.init_from:
    return [f'weights: restored from the checkpoint (the run started from {config.init_from})']
  lines = ['weights: random initialisation (config.init_from is empty)']
  if config.model.size in PRETRAINED_SIZES:
    lines.append(f'warning: a {config.model.size} ViT from random initialisation scores far '
                 f'below the published figures; pass --config.init_from=PATH with ImageNet '
                 f'ViT weights (README, "Real datasets")')
  return lines
