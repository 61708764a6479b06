"""One path abstraction for everything a run writes or reads.

The workdir (config.json, manifest.json, results.json, metrics.jsonl, tensorboard/,
checkpoints/) and config.init_from may be local paths or object-store URIs: gs://, s3://,
az://, hf:// (the schemes `etils.epath` serves, which is what orbax itself uses for its
checkpoint folders). Every such path goes through this module, so that a `gs://` workdir is
written to the bucket on every host instead of silently becoming a local folder named `gs:`.

- `resolve(path, what)` checks the scheme: a local path (or file://) becomes absolute, a URI
  of a supported scheme is kept as it is, and any other `scheme://` is refused with a
  ValueError naming `what` (the flag or field) and the supported schemes. A supported scheme
  whose libraries are missing (for gs://: google-cloud-storage, which orbax asks for the
  bucket's layout, and gcsfs unless TensorFlow's gfile is installed; s3fs, adlfs) is refused
  the same way, with the package to install (`pip install -e '.[gcs]'` for gs://).
- `join`, `exists`, `isdir`, `makedirs`, `listdir`, `rmtree`, `read_text`, `write_text`,
  `open` work on both kinds. `write_text` is atomic: a local file is written beside and
  renamed; an object store publishes an object only when its upload completes.
- `local_copy` gives a local path of a remote file or folder (copied once into a cache
  folder), for readers that need a real file (np.load, safetensors, zip).
- `RecordWriterFactory` lets tensorboardX write its event files through epath.

Object stores have no append: `AppendFile` keeps a file's contents and uploads the whole
object on each flush, which is fine for metrics.jsonl and event files (kilobytes to a few MB).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import shutil
import tempfile
from typing import IO, Any

from etils import epath

# Schemes that etils.epath serves (etils.epath.gpath), with the fsspec package each needs when
# TensorFlow (gfile) is not installed.
SCHEMES = {'gs': 'gcsfs', 's3': 's3fs', 'az': 'adlfs', 'hf': 'huggingface_hub'}
_URI = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')
# Where `local_copy` puts remote files (OGFR_CACHE_DIR overrides it).
CACHE_ENV = 'OGFR_CACHE_DIR'


def scheme(path: str) -> str | None:
  """'gs' for 'gs://b/x', None for a local path (file:// counts as local)."""
  m = _URI.match(os.fspath(path))
  if m is None or m.group(1).lower() == 'file':
    return None
  return m.group(1).lower()


def is_remote(path: str) -> bool:
  return scheme(path) is not None


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:  # a parent package is missing
    return False


def _check_backend(path: str, what: str) -> None:
  """Raises ValueError when a library that a supported scheme needs is missing."""
  name = scheme(path)
  if name == 'gs' and not _importable('google.cloud.storage'):
    raise ValueError(
        f'{what}={path!r}: gs:// needs the google-cloud-storage package (orbax asks the bucket '
        'for its layout before it lists checkpoints), which is not installed: '
        "pip install -e '.[gcs]'")
  gpath = epath.Path(path)
  backend = getattr(gpath, '_backend', None)
  if backend is None or type(backend).__name__ != '_FileSystemSpecBackend':
    return  # TensorFlow's gfile serves it
  import fsspec  # pylint: disable=g-import-not-at-top
  protocol = {'gs': 'gcs'}.get(name, name)
  try:
    fsspec.get_filesystem_class(protocol)
  except (ImportError, ValueError) as e:
    raise ValueError(
        f'{what}={path!r}: {name}:// needs the {SCHEMES[name]} package, which is not '
        f'installed (pip install {SCHEMES[name]}' + (", or pip install -e '.[gcs]')"
                                                     if name == 'gs' else ')')) from None


def resolve(path: str, what: str = 'path') -> str:
  """The canonical form of a user-given path; raises ValueError for a scheme not served.

  `what` names the flag or config field in the message (e.g. '--workdir').
  """
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise ValueError(f'{what}: empty path')
  path = os.fspath(path)
  m = _URI.match(path)
  if m is None:
    return os.path.abspath(os.path.expanduser(path))
  name = m.group(1).lower()
  if name == 'file':
    return os.path.abspath(path[len(m.group(0)):] or '/')
  if name not in SCHEMES:
    supported = ', '.join(f'{s}://' for s in SCHEMES)
    raise ValueError(
        f'{what}={path!r}: the scheme {name}:// is not supported (supported: a local path, '
        f'file://, {supported}); mount the storage (e.g. gcsfuse) and pass the local path')
  if m.group(1) != name:
    path = name + path[len(m.group(1)):]
  _check_backend(path, what)
  return path.rstrip('/') if len(path) > len(name) + 3 else path


def join(base: str, *parts: str) -> str:
  """base/part/...; keeps the scheme of a URI (os.path.join would too, but say it)."""
  if is_remote(base):
    return '/'.join([base.rstrip('/')] + [p.strip('/') for p in parts])
  return os.path.join(base, *parts)


def _p(path: str) -> epath.Path:
  return epath.Path(path)


def exists(path: str) -> bool:
  return _p(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _p(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _p(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  if is_remote(path):
    return sorted(p.name for p in _p(path).iterdir())
  return sorted(os.listdir(path))


def rmtree(path: str) -> None:
  """Removes a folder and everything in it; nothing happens when it does not exist."""
  if is_remote(path):
    if _p(path).exists():
      _p(path).rmtree(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def open(path: str, mode: str = 'r') -> IO[Any]:  # pylint: disable=redefined-builtin
  if is_remote(path):
    return _p(path).open(mode)
  return io.open(path, mode)  # pylint: disable=unspecified-encoding


def read_text(path: str) -> str:
  with open(path, 'r') as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes `text` so that readers see the old or the new contents, never a part."""
  if is_remote(path):
    _p(path).write_text(text)
    return
  tmp = path + '.tmp'
  with io.open(tmp, 'w') as f:  # pylint: disable=unspecified-encoding
    f.write(text)
  os.replace(tmp, path)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` whole (a local file is replaced at once, as in write_text)."""
  if is_remote(path):
    _p(path).write_bytes(data)
    return
  tmp = path + '.tmp'
  with io.open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


class AppendFile:
  """A text file opened for appending, also on object stores (which have no append).

  Locally a plain append-mode file. Remotely the existing object is read once, and every
  `flush` uploads the whole contents again.
  """

  def __init__(self, path: str):
    self.path = path
    self._remote = is_remote(path)
    if self._remote:
      self._buffer = io.StringIO()
      if exists(path):
        self._buffer.write(read_text(path))
      self._file = None
    else:
      self._file = io.open(path, 'a')  # pylint: disable=unspecified-encoding

  def write(self, text: str) -> None:
    if self._remote:
      self._buffer.write(text)
    else:
      self._file.write(text)

  def flush(self) -> None:
    if self._remote:
      _p(self.path).write_text(self._buffer.getvalue())
    else:
      self._file.flush()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None


class _RecordWriter:
  """tensorboardX record writer of one event file through epath (whole upload per flush)."""

  def __init__(self, path: str):
    self.path = path
    self._buffer = io.BytesIO()
    self._closed = False

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    _p(self.path).write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    if not self._closed:
      self.flush()
      self._closed = True


class RecordWriterFactory:
  """tensorboardX's writer-factory interface (open, directory_check) over epath."""

  def open(self, path: str) -> _RecordWriter:
    return _RecordWriter(path)

  def directory_check(self, path: str) -> None:
    makedirs(path)


def register_tensorboard() -> None:
  """Routes tensorboardX's event files for every remote scheme through this module."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  for name in SCHEMES:
    record_writer.register_writer_factory(name, RecordWriterFactory())


def _cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), 'ogfr_jax_cache')


def local_copy(path: str, what: str = 'path') -> str:
  """A local path holding `path`'s contents: `path` itself when local, else a cached copy.

  A remote file or folder is copied once into OGFR_CACHE_DIR (default: the temp folder),
  under a name derived from its URI; a missing remote path raises FileNotFoundError.
  """
  path = resolve(path, what)
  if not is_remote(path):
    return path
  src = _p(path)
  if not src.exists():
    raise FileNotFoundError(f'{what}={path!r}: no such file or folder')
  digest = hashlib.sha256(path.encode()).hexdigest()[:16]
  dst = os.path.join(_cache_dir(), digest, src.name)
  if os.path.exists(dst):
    return dst
  tmp = dst + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if src.is_dir():
    for root, _, files in src.walk():
      rel = os.path.relpath(os.fspath(root).rstrip('/'), os.fspath(src).rstrip('/'))
      os.makedirs(os.path.join(tmp, rel), exist_ok=True)
      for name in files:
        with io.open(os.path.join(tmp, rel, name), 'wb') as f:
          f.write((root / name).read_bytes())
  else:
    with io.open(tmp, 'wb') as f:
      f.write(src.read_bytes())
  os.replace(tmp, dst)
  return dst
