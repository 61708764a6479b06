"""The run manifest: what produced a set of results, recorded next to them.

A figure in results.json is only reproducible with the code version, the library versions,
the hardware and the seeds that produced it, so the trainer stores this record beside the
results (results.json "manifest", and WORKDIR/manifest.json). Everything here is best-effort:
a missing git, a package installed without metadata or an unusual platform gives None for
that field, never an error, because a manifest must not stop a finished run from saving its
results.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Optional

# Distributions whose versions decide numerics or behaviour of a run.
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy',
            'ml-collections')
_GIT_TIMEOUT_S = 10


def _git(args: list[str], cwd: str) -> Optional[str]:
  try:
    out = subprocess.run(['git', *args], cwd=cwd, capture_output=True, text=True,
                         timeout=_GIT_TIMEOUT_S, check=False)
  except (OSError, subprocess.SubprocessError):
    return None  # no git binary, or it hung
  return out.stdout if out.returncode == 0 else None


def git_state(path: Optional[str] = None) -> dict[str, Any]:
  """{'commit', 'dirty'} of the git checkout holding the ogfr_jax sources (or `path`).

  None for both when the sources are not tracked by a git checkout (an installed wheel, a
  copied tree, or a package directory that merely sits inside some other repository).
  'dirty' is True when a tracked file of the checkout differs from the commit; untracked
  files (run folders, caches) do not count.
  """
  if path is None:
    path = os.path.dirname(os.path.abspath(__file__))
  none = {'commit': None, 'dirty': None}
  if not os.path.isdir(path):
    return none
  top = _git(['rev-parse', '--show-toplevel'], path)
  if top is None:
    return none
  top = top.strip()
  # The sources must be tracked in that checkout, not just lie below it (e.g. a virtualenv
  # inside an unrelated repository).
  if _git(['ls-files', '--error-unmatch', '--', os.path.relpath(path, top)], top) is None:
    return none
  commit = _git(['rev-parse', 'HEAD'], top)
  status = _git(['status', '--porcelain', '--untracked-files=no'], top)
  return {'commit': commit.strip() if commit else None,
          'dirty': None if status is None else bool(status.strip())}


def package_versions() -> dict[str, Optional[str]]:
  versions: dict[str, Optional[str]] = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  versions['python'] = platform.python_version()
  return versions


def device_info() -> dict[str, Any]:
  """Backend, device kind and counts as JAX sees them (initialises the backend if needed)."""
  try:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    return {'backend': jax.default_backend(),
            'device_kind': devices[0].device_kind if devices else None,
            'device_count': jax.device_count(), 'local_device_count': jax.local_device_count(),
            'process_count': jax.process_count(), 'process_index': jax.process_index()}
  except Exception:  # pylint: disable=broad-except  (a manifest never fails a run)
    return {'backend': None, 'device_kind': None, 'device_count': None,
            'local_device_count': None, 'process_count': None, 'process_index': None}


def _get(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return None
  return node


def _iso(timestamp: float) -> str:
  return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(
      timespec='seconds')


def run_manifest(config: Any, *, wall_time_s: Optional[float] = None,
                 start_time: Optional[float] = None,
                 layout: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """The manifest of a run with `config` (a ConfigDict or a plain dict).

  wall_time_s: the run's duration so far, if known. start_time: its start (seconds since the
  epoch); by default now minus wall_time_s, or now. Returns a JSON-serialisable dict with
  git (commit, dirty), packages, devices, seeds, hostname, argv, start_time (ISO 8601, UTC)
  and wall_time_s; with `layout` (parallel.describe_layout: the mesh, per-device parameter and
  optimizer bytes, the sharding of the largest arrays) also 'layout'.
  """
  now = time.time()
  if start_time is None:
    start_time = now - wall_time_s if wall_time_s is not None else now
  out = {
      'git': git_state(),
      'packages': package_versions(),
      'devices': device_info(),
      'seeds': {k: _get(config, k) for k in ('seed', 'synthetic.seed')
                if _get(config, k) is not None},
      'hostname': socket.gethostname(),
      'argv': list(sys.argv),
      'start_time': _iso(start_time),
      'wall_time_s': None if wall_time_s is None else float(wall_time_s),
  }
  if layout is not None:
    out['layout'] = layout
  return out


def record_layout(workdir: str, layout: dict[str, Any]) -> None:
  """Adds `layout` to WORKDIR/manifest.json (process 0; the mesh exists only after the
  workdir is set up, so prepare_workdir writes the manifest without it)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ogfr_jax import paths  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  path = paths.join(paths.resolve(workdir, '--workdir'), 'manifest.json')
  try:
    record = json.loads(paths.read_text(path)) if paths.exists(path) else {}
  except (OSError, ValueError):
    record = {}  # best-effort, as the rest of the manifest
  record['layout'] = layout
  paths.write_text(path, json.dumps(record, indent=2, sort_keys=True))
