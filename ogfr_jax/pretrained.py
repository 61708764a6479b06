"""Pretrained ViT weights in and out: ImageNet / ReID checkpoints -> the OGFR backbones, and the
trained student -> a timm-compatible safetensors file.

Readers (each returns a flat dict name -> np.ndarray, plus metadata):
  npz          google-research/vision_transformer (AugReg i21k/i1k) and big_vision
               (`params/...`, `params/img/...`, scanned `encoderblock` stacks)
  torch        timm / TransReID state dicts (.pth, .bin), also wrapped as {'state_dict': ...} or
               {'model': ...}, DataParallel `module.` and TransReID `base.` prefixes
  safetensors  through the safetensors library with numpy (no torch needed)
  orbax        a folder written by `python -m ogfr_jax.tools.convert`

Safety of PyTorch files: a .pth is a pickle, and unpickling can run arbitrary code. With torch
installed we read it with `torch.load(..., weights_only=True)`; without torch, with a small
reader of our own (`read_torch_safe`) whose unpickler resolves only an allowlist of globals
(OrderedDict, torch's tensor-rebuild functions, storage types) and builds numpy arrays from the
raw storages. Anything else in the pickle (a `__reduce__` that calls os.system, an argparse
Namespace, a custom class) stops the load with `UnsafeCheckpointError` before it is called.
`.npz` files are read with `allow_pickle=False`.

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

import collections
import dataclasses
import json
import math
import os
import pickle
import re
import sys
import zipfile
from typing import Any, Callable, Iterable, Mapping, Optional

import ml_dtypes
import numpy as np
from absl import logging

from ogfr_jax import paths

FORMATS = ('auto', 'npz', 'torch', 'safetensors', 'orbax')

# The folder layout written by `ogfr_jax.tools.convert`.
CONVERTED_PARAMS_DIR = 'params'
CONVERTED_METADATA = 'metadata.json'

# Metadata key (safetensors header / converted folder) holding the token grid of pos_embed.
GRID_KEY = 'ogfr.grid'


class UnsafeCheckpointError(ValueError):
  """A checkpoint that would need arbitrary Python objects to be unpickled; never loaded."""


@dataclasses.dataclass
class Checkpoint:
  """What a reader returns: flat name -> array, the header metadata, and where it came from."""
  tensors: dict[str, np.ndarray]
  metadata: dict[str, str]
  path: str
  fmt: str
  note: str = ''  # e.g. the wrapper key a state dict was found under


# ---------------------------------------------------------------------------------------------
# Format detection


def _is_converted_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, CONVERTED_PARAMS_DIR))


def detect_format(path: str) -> str:
  """'npz', 'torch', 'safetensors' or 'orbax' from the file's first bytes (not its name).

  zip with .npy members -> npz; zip with a data.pkl -> torch (the format of torch >= 1.6);
  a pickle PROTO opcode -> torch (the legacy format); an 8-byte little-endian header length
  followed by '{' -> safetensors; a folder written by the convert tool -> orbax.
  """
  if os.path.isdir(path):
    if _is_converted_dir(path):
      return 'orbax'
    raise ValueError(f'{path} is a folder, but not one written by python -m '
                     f'ogfr_jax.tools.convert (it has no {CONVERTED_PARAMS_DIR}/ checkpoint)')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'pretrained weights {path}: no such file')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(16)
  if head[:4] == b'PK\x03\x04':
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except zipfile.BadZipFile as e:
      raise ValueError(f'{path} starts like a zip archive but cannot be read: {e}') from e
    if any(n.endswith('.npy') for n in names):
      return 'npz'
    if any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
      return 'torch'
    raise ValueError(f'{path} is a zip archive but neither an .npz (no .npy members) nor a '
                     f'PyTorch checkpoint (no data.pkl)')
  if head[:1] == b'\x80':
    return 'torch'
  if len(head) >= 9 and head[8:9] == b'{' and 8 + int.from_bytes(head[:8], 'little') <= size:
    return 'safetensors'
  raise ValueError(f'{path}: unknown checkpoint format (not an .npz, a PyTorch file or '
                   f'safetensors); set config.init_format if the detection is wrong')


# ---------------------------------------------------------------------------------------------
# Readers


def read_npz(path: str) -> Checkpoint:
  """A JAX .npz of flat '/'-joined names; object arrays (pickles) are refused."""
  try:
    with np.load(path, allow_pickle=False) as z:
      tensors = {name: np.asarray(z[name]) for name in z.files}
  except ValueError as e:
    if 'allow_pickle' in str(e):
      raise UnsafeCheckpointError(
          f'{path} holds pickled Python objects and was not loaded; an .npz of weights must '
          f'hold plain numeric arrays') from e
    raise ValueError(f'{path} is not a readable .npz: {e}') from e
  return Checkpoint(tensors, {}, path, 'npz')


def read_safetensors(path: str) -> Checkpoint:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework='np') as f:
      metadata = dict(f.metadata() or {})
      tensors = {name: f.get_tensor(name) for name in f.keys()}
  except Exception as e:  # the library raises its own SafetensorError type
    raise ValueError(f'{path} is not a readable safetensors file: {e}') from e
  return Checkpoint(tensors, metadata, path, 'safetensors')


def read_orbax(path: str) -> Checkpoint:
  """A folder written by `ogfr_jax.tools.convert`: our ViT tree plus metadata.json."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  tree = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(path), CONVERTED_PARAMS_DIR))
  tensors = {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}
  metadata = {}
  meta_path = os.path.join(path, CONVERTED_METADATA)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      metadata = {k: str(v) for k, v in json.load(f).items()}
  return Checkpoint(tensors, metadata, path, 'orbax')


def torch_available() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _refusal(path: str, what: str) -> str:
  return (f'{path} contains arbitrary Python objects ({what}) and was not loaded: unpickling it '
          f'could run code. If you trust the file, convert it to safetensors in a trusted '
          f'environment (safetensors.torch.save_file(state_dict, "model.safetensors")) and load '
          f'that instead')


def read_torch(path: str, *, use_torch: Optional[bool] = None) -> Checkpoint:
  """A PyTorch checkpoint, without ever running code from it.

  With torch installed (and `use_torch` not False) this is `torch.load(weights_only=True)`;
  otherwise `read_torch_safe`. Both refuse files that need arbitrary objects.
  """
  if use_torch is None:
    use_torch = torch_available()
  if not use_torch:
    obj = read_torch_safe(path)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    try:
      obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
      raise UnsafeCheckpointError(_refusal(path, _torch_refusal_reason(str(e)))) from e
    except (RuntimeError, EOFError, OSError) as e:
      raise ValueError(f'{path} is not a readable PyTorch checkpoint: {e}') from e
    obj = _torch_to_numpy(obj)
  tensors, note = unwrap_state_dict(obj, path)
  return Checkpoint(tensors, {}, path, 'torch', note)


def _torch_refusal_reason(message: str) -> str:
  """The line of torch's weights_only error that names the offending global, if any."""
  m = re.search(r'GLOBAL\s+([\w.]+)', message)
  return f'{m.group(1)}, refused by torch.load(weights_only=True)' if m else \
      'refused by torch.load(weights_only=True)'


def _torch_to_numpy(obj: Any) -> Any:
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  if isinstance(obj, Mapping):
    return {k: _torch_to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_torch_to_numpy(v) for v in obj)
  return obj


# Where training scripts put the state dict inside a bigger checkpoint, in order of preference.
_WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'module', 'net', 'params')


def unwrap_state_dict(obj: Any, path: str) -> tuple[dict[str, np.ndarray], str]:
  """The flat state dict inside a loaded checkpoint, and which wrapper key held it ('' if none)."""
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict')
  note = ''
  while not any(isinstance(v, np.ndarray) for v in obj.values()):
    inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      raise ValueError(f'{path} holds no tensors at the top level nor under any of '
                       f'{list(_WRAPPER_KEYS)}; its keys are {sorted(map(str, obj))[:20]}')
    note = f'{note}{inner}/'
    obj = obj[inner]
  flat = {}

  def walk(prefix: str, value: Any) -> None:
    if isinstance(value, np.ndarray):
      flat[prefix] = value
    elif isinstance(value, Mapping):
      for k, v in value.items():
        walk(f'{prefix}.{k}' if prefix else str(k), v)

  walk('', obj)
  return flat, (f'state dict under {note[:-1]!r}' if note else '')


# --- a torch file reader that runs no code from the file -------------------------------------

_STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32), 'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16), 'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_),
}
# The legacy (pre-zip) torch format starts with this number, pickled.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageRef:
  key: str
  dtype_name: str
  numel: int


@dataclasses.dataclass(frozen=True, slots=True)
class _TensorRef:
  storage: _StorageRef
  offset: int
  size: tuple
  stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _StorageRef):
    raise pickle.UnpicklingError('malformed tensor record (its storage is not a storage)')
  ints = lambda xs: tuple(int(x) for x in xs)  # noqa: E731
  return _TensorRef(storage, int(storage_offset), ints(size), ints(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  del requires_grad, backward_hooks, state
  return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    # A storage type resolves to its name: a plain string is neither callable nor buildable.
    **{('torch', name): name for name in _STORAGE_DTYPES},
}


class _SafeUnpickler(pickle.Unpickler):
  """Resolves only allowlisted globals; storages become references, never raw memory."""

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    found = _ALLOWED_GLOBALS.get((module, name))
    if found is None:
      raise UnsafeCheckpointError(_refusal(self._path, f'{module}.{name}'))
    return found

  def persistent_load(self, pid: Any) -> Any:
    ok = (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'
          and isinstance(pid[1], str) and pid[1] in _STORAGE_DTYPES
          and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0)
    if not ok or (len(pid) == 6 and pid[5] is not None):
      raise UnsafeCheckpointError(_refusal(self._path, f'persistent id {str(pid)[:80]}'))
    return _StorageRef(pid[2], pid[1], pid[4])


def _unpickle(file, path: str) -> Any:
  try:
    return _SafeUnpickler(file, path).load()
  except UnsafeCheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, ValueError,
          IndexError, KeyError) as e:
    raise ValueError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})') \
        from e


def _resolve(obj: Any, storages: Mapping[str, np.ndarray], path: str) -> Any:
  """Replaces tensor references by numpy arrays (copies, bounds-checked)."""
  if isinstance(obj, _TensorRef):
    data = storages.get(obj.storage.key)
    if data is None:
      raise ValueError(f'{path}: a tensor refers to a missing storage {obj.storage.key!r}')
    size, stride, offset = obj.size, obj.stride, obj.offset
    if (len(size) != len(stride) or offset < 0 or any(s < 0 for s in size)
        or any(s < 0 for s in stride)):
      raise ValueError(f'{path}: malformed tensor record (size {size}, stride {stride})')
    if 0 in size:
      return np.zeros(size, data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
      raise ValueError(f'{path}: a tensor reaches past the end of its storage')
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=[s * data.itemsize for s in stride], writeable=False)
    return np.array(view)
  if isinstance(obj, _StorageRef):
    raise ValueError(f'{path} holds a bare storage, not a state dict of tensors')
  if isinstance(obj, Mapping):
    return {k: _resolve(v, storages, path) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_resolve(v, storages, path) for v in obj]
  return obj


def _collect_storages(obj: Any, out: dict[str, _StorageRef]) -> None:
  if isinstance(obj, _TensorRef):
    out[obj.storage.key] = obj.storage
  elif isinstance(obj, Mapping):
    for v in obj.values():
      _collect_storages(v, out)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _collect_storages(v, out)


def _storage_array(raw: bytes, ref: _StorageRef, path: str, big_endian: bool) -> np.ndarray:
  dtype = _STORAGE_DTYPES[ref.dtype_name]
  if len(raw) < ref.numel * dtype.itemsize:
    raise ValueError(f'{path}: storage {ref.key!r} is truncated')
  arr = np.frombuffer(raw, dtype=dtype.newbyteorder('>') if big_endian else dtype,
                      count=ref.numel)
  return arr.astype(dtype) if big_endian else arr


def read_torch_safe(path: str) -> Any:
  """Reads a PyTorch checkpoint (zip or legacy format) into numpy without torch.

  The pickle is read by an unpickler that resolves only `_ALLOWED_GLOBALS` (the same idea as
  torch's weights_only loader); tensors become bounds-checked copies of their storages.
  """
  with open(path, 'rb') as f:
    zipped = f.read(4) == b'PK\x03\x04'
  if zipped:
    return _read_torch_zip(path)
  return _read_torch_legacy(path)


def _read_torch_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as z:
    pkls = [n for n in z.namelist() if n == 'data.pkl' or n.endswith('/data.pkl')]
    if len(pkls) != 1:
      raise ValueError(f'{path}: expected one data.pkl in the archive, found {len(pkls)}')
    prefix = pkls[0][:-len('data.pkl')]
    with z.open(pkls[0]) as f:
      obj = _unpickle(f, path)
    big_endian = False
    if prefix + 'byteorder' in z.namelist():
      big_endian = z.read(prefix + 'byteorder').strip() == b'big'
    refs: dict[str, _StorageRef] = {}
    _collect_storages(obj, refs)
    storages = {}
    for key, ref in refs.items():
      member = f'{prefix}data/{key}'
      try:
        raw = z.read(member)
      except KeyError as e:
        raise ValueError(f'{path}: storage {member} is missing from the archive') from e
      storages[key] = _storage_array(raw, ref, path, big_endian)
  return _resolve(obj, storages, path)


def _read_torch_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    magic = _unpickle(f, path)
    if magic != _LEGACY_MAGIC:
      raise ValueError(f'{path} is a pickle but not a PyTorch checkpoint (no torch magic '
                       f'number); it was not loaded')
    _unpickle(f, path)  # protocol version
    sys_info = _unpickle(f, path)
    big_endian = isinstance(sys_info, Mapping) and sys_info.get('little_endian') is False
    obj = _unpickle(f, path)
    keys = _unpickle(f, path)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
      raise ValueError(f'{path}: malformed storage list in a legacy PyTorch checkpoint')
    refs: dict[str, _StorageRef] = {}
    _collect_storages(obj, refs)
    storages = {}
    for key in keys:
      numel = int.from_bytes(f.read(8), 'big' if big_endian else 'little', signed=True)
      ref = refs.get(key)
      if ref is None or numel != ref.numel:
        raise ValueError(f'{path}: storage {key!r} does not match the tensors that use it')
      dtype = _STORAGE_DTYPES[ref.dtype_name]
      storages[key] = _storage_array(f.read(numel * dtype.itemsize), ref, path, big_endian)
  return _resolve(obj, storages, path)


def read_checkpoint(path: str, fmt: str = 'auto') -> Checkpoint:
  """Reads any supported file into a `Checkpoint` (`fmt` as config.init_format)."""
  if fmt not in FORMATS:
    raise ValueError(f'config.init_format={fmt!r}: use one of {list(FORMATS)}')
  # gs:// (...) weights are copied to a local cache once: the readers need a real file.
  path = paths.local_copy(path, 'config.init_from')
  if not os.path.exists(path):
    raise FileNotFoundError(f'pretrained weights {path} (config.init_from): no such file')
  if fmt == 'auto':
    fmt = detect_format(path)
  reader = {'npz': read_npz, 'torch': read_torch, 'safetensors': read_safetensors,
            'orbax': read_orbax}[fmt]
  return reader(path)


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


_TIMM_BLOCK = {
    'norm1.weight': ('norm1/scale', _same), 'norm1.bias': ('norm1/bias', _same),
    'attn.qkv.weight': ('attn/qkv/kernel', _t), 'attn.qkv.bias': ('attn/qkv/bias', _same),
    'attn.proj.weight': ('attn/proj/kernel', _t), 'attn.proj.bias': ('attn/proj/bias', _same),
    'norm2.weight': ('norm2/scale', _same), 'norm2.bias': ('norm2/bias', _same),
    'mlp.fc1.weight': ('fc1/kernel', _t), 'mlp.fc1.bias': ('fc1/bias', _same),
    'mlp.fc2.weight': ('fc2/kernel', _t), 'mlp.fc2.bias': ('fc2/bias', _same),
}
_TIMM_TOP = {
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
      if rest in _TIMM_TOP:
        target, fn = _TIMM_TOP[rest]
        entries[target] = _Entry(fn(key, value), key, value.shape)
        continue
      m = re.match(r'^blocks\.(\d+)\.(.+)$', rest)
      if m and m.group(2) in _TIMM_BLOCK:
        target, fn = _TIMM_BLOCK[m.group(2)]
        depth = max(depth, int(m.group(1)) + 1)
        entries[f'blocks_{m.group(1)}/{target}'] = _Entry(fn(key, value), key, value.shape)
        continue
    if key.startswith(outer):
      # TransReID with JPM keeps the trained last block and norm in b1, the part branch in b2.
      m = re.match(r'^(b1|b2)\.(0\.(.+)|1\.(weight|bias))$', key[len(outer):])
      if m and (m.group(4) or m.group(3) in _TIMM_BLOCK):
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
      sub, fn = _TIMM_BLOCK[rest]
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


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(dict(tree))


def _unflat(flat: Mapping[tuple[str, ...], Any], like: Any) -> Any:
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
  flat = {'/'.join(k): v for k, v in _flat(vit_params).items()}
  values, rows, naming = map_vit(checkpoint, flat, grid=grid, num_heads=num_heads,
                                 source_grid=source_grid)
  new = {tuple(k.split('/')): values.get(k, v) for k, v in flat.items()}
  report = ImportReport(checkpoint.path, checkpoint.fmt, naming, ('vit',), rows,
                        checkpoint.note)
  return _unflat(new, vit_params), report


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
  flat = _flat(params)
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
  return _unflat(flat, params), report


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


# ---------------------------------------------------------------------------------------------
# Export


def vit_to_timm(vit_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our ViT tree -> a timm `VisionTransformer` state dict (float32 numpy, contiguous).

  SIE and the part branch (JPM) have no timm counterpart and are left out.
  """
  flat = {'/'.join(k): np.asarray(v, np.float32) for k, v in _flat(vit_params).items()}
  inverse = {target: (src, fn) for src, (target, fn) in _TIMM_TOP.items()}
  out = {}
  for key, value in flat.items():
    m = re.match(r'^blocks_(\d+)/(.+)$', key)
    if m:
      src = next((s for s, (t, _) in _TIMM_BLOCK.items() if t == m.group(2)), None)
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
    parts.append('model.student_erase: the occluder-token erasure before the blocks')
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
  if branch == 'student' and config.model.student_erase:
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
