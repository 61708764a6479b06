"""Reading pretrained ViT checkpoints into flat numpy dicts, without running code from them.

Readers (each returns a `Checkpoint`: flat name -> np.ndarray, plus metadata):
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
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import re
import zipfile
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

from ogfr_jax import paths
from ogfr_jax import source_weights

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


# The largest header the safetensors library reads (its MAX_HEADER_SIZE).
_SAFETENSORS_MAX_HEADER = 100_000_000


def _is_safetensors(path: str, head: bytes, size: int) -> bool:
  """Whether the file has a safetensors header: an 8-byte little-endian length n, then n bytes
  (inside the file) that parse as a JSON object."""
  if len(head) < 10 or head[8:9] != b'{':
    return False
  n = int.from_bytes(head[:8], 'little')
  if not 2 <= n <= _SAFETENSORS_MAX_HEADER or 8 + n > size:
    return False
  with open(path, 'rb') as f:
    f.seek(8)
    text = f.read(n)
  try:
    return isinstance(json.loads(text), dict)
  except (UnicodeDecodeError, json.JSONDecodeError):
    return False


def detect_format(path: str) -> str:
  """'npz', 'torch', 'safetensors' or 'orbax' from the file's first bytes (not its name).

  zip with .npy members -> npz; zip with a data.pkl -> torch (the format of torch >= 1.6);
  an 8-byte little-endian header length followed by that many bytes of a JSON object ->
  safetensors; a pickle PROTO opcode -> torch (the legacy format); a folder written by the
  convert tool -> orbax. Safetensors is tested before the pickle opcode: its first byte is the
  low byte of the header length, which is 0x80, the PROTO opcode, for one length in 256.
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
  if _is_safetensors(path, head, size):
    return 'safetensors'
  if head[:1] == b'\x80':
    return 'torch'
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
  path = paths.local_copy(source_weights.resolve(path), 'config.init_from')
  if not os.path.exists(path):
    raise FileNotFoundError(f'pretrained weights {path} (config.init_from): no such file')
  if fmt == 'auto':
    fmt = detect_format(path)
  reader = {'npz': read_npz, 'torch': read_torch, 'safetensors': read_safetensors,
            'orbax': read_orbax}[fmt]
  return reader(path)
