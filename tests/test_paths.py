"""Workdirs and weights on object stores: everything a run writes goes through ogfr_jax.paths.

A fake bucket serves gs:// here: an in-memory fsspec filesystem registered for the gcs
protocol, which is what etils.epath (and so orbax) uses for gs:// when TensorFlow is not
installed. The tests check that the files land in the bucket and nothing in the local folder.
"""

import json
import os
import sys

import fsspec  # noqa: F401  (registers sys.modules['fsspec.registry'])
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from orbax.checkpoint._src.path import gcs_utils

from ogfr_jax import checkpoints
from ogfr_jax import evaluator
from ogfr_jax import paths
from ogfr_jax import pretrained
from ogfr_jax import run_config
from ogfr_jax import writers
from helpers import make_config

_REGISTRY = sys.modules['fsspec.registry']  # (fsspec.registry is a read-only view)


class FakeBucket(MemoryFileSystem):
  """gs://BUCKET/... kept in memory (its own store, apart from fsspec's memory://)."""
  protocol = ('gs', 'gcs')
  store: dict = {}
  pseudo_dirs = ['']

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        path = path[len(prefix):]
    path = path.strip('/')
    return '/' + path if path else ''

  def unstrip_protocol(self, name):
    return 'gs://' + name.lstrip('/')


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  """A clean fake gs:// store; the test runs in an empty local folder to show nothing lands
  there."""
  for name in ('gcs', 'gs'):
    monkeypatch.setitem(_REGISTRY._registry, name, FakeBucket)  # pylint: disable=protected-access
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  # The client libraries of real GCS are not needed by the fake: a flat namespace.
  monkeypatch.setattr(paths, '_importable', lambda module: True)
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)
  FakeBucket.store.clear()
  FakeBucket.pseudo_dirs[:] = ['']
  monkeypatch.chdir(tmp_path)
  yield FakeBucket()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  assert os.listdir(tmp_path) == [], 'a gs:// path was written as a local folder'


def test_resolve_local_and_file_scheme(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve('runs/x', '--workdir') == str(tmp_path / 'runs' / 'x')
  assert paths.resolve('file:///a/b') == '/a/b'
  assert not paths.is_remote('/a/b') and paths.is_remote('gs://b/x')


@pytest.mark.parametrize('uri', ['memory://runs/x', 'ftp://host/x', 'hdfs://nn/x'])
def test_unsupported_scheme_is_refused_naming_the_flag(uri):
  with pytest.raises(ValueError, match=r"--workdir='[a-z]+://.*not supported.*gs://"):
    paths.resolve(uri, '--workdir')
  with pytest.raises(ValueError, match='not supported'):
    run_config.prepare_workdir(uri, make_config({'seed': 3}))
  with pytest.raises(ValueError, match='not supported'):
    checkpoints.make_manager(uri)


def test_supported_scheme_without_its_library_is_refused(monkeypatch):
  # s3:// needs s3fs: make it unimportable whatever is installed.
  monkeypatch.delitem(_REGISTRY._registry, 's3', raising=False)  # pylint: disable=protected-access
  monkeypatch.setitem(_REGISTRY.known_implementations, 's3',
                      {'class': 'no_such_module_s3fs.S3FileSystem', 'err': 'Install s3fs'})
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"--workdir='s3://b/x': s3:// needs the s3fs package"):
    paths.resolve('s3://b/x', '--workdir')


def test_gs_without_the_gcs_client_is_refused(monkeypatch):
  monkeypatch.setattr(paths, '_importable', lambda module: module != 'google.cloud.storage')
  with pytest.raises(ValueError, match=r"--workdir='gs://b/x': gs:// needs the "
                     r"google-cloud-storage package"):
    paths.resolve('gs://b/x', '--workdir')


def test_workdir_files_go_to_the_bucket(bucket):
  workdir = 'gs://bkt/runs/x'
  config = make_config({'seed': 3})
  run_config.prepare_workdir(workdir, config)
  saved = json.loads(bucket.cat_file('gs://bkt/runs/x/config.json'))
  assert saved['seed'] == 3
  assert 'git' in json.loads(bucket.cat_file('gs://bkt/runs/x/manifest.json'))
  # The same config resumes; another one is refused naming its checkpoints, and --overwrite
  # deletes them in the bucket.
  run_config.prepare_workdir(workdir, config)
  bucket.pipe_file('gs://bkt/runs/x/checkpoints/5/state/x', b'1')
  other = make_config({'seed': 3})
  other.seed = 4
  with pytest.raises(ValueError, match=r'(?s)different config.*seed: 3 -> 4.*steps \[5\]'):
    run_config.prepare_workdir(workdir, other)
  run_config.prepare_workdir(workdir, other, overwrite=True)
  assert not bucket.exists('gs://bkt/runs/x/checkpoints')
  assert json.loads(bucket.cat_file('gs://bkt/runs/x/config.json'))['seed'] == 4

  evaluator.write_results(workdir, {'synthetic': {'mAP': 0.5}})
  assert json.loads(bucket.cat_file('gs://bkt/runs/x/results.json')) == {
      'synthetic': {'mAP': 0.5}}


def test_metrics_and_tensorboard_in_the_bucket(bucket):
  workdir = 'gs://bkt/runs/m'
  w = writers.Writer(workdir)
  w.scalars(1, {'train/loss': 2.0})
  w.scalars(2, {'train/loss': 1.5})
  w.close()
  lines = bucket.cat_file('gs://bkt/runs/m/metrics.jsonl').decode().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [1, 2]
  events = bucket.ls('gs://bkt/runs/m/tensorboard', detail=False)
  assert len(events) == 1 and 'tfevents' in events[0]
  assert bucket.size(events[0]) > 0
  # A resumed run drops what was logged after its checkpoint, then appends.
  w = writers.Writer(workdir, resume_step=1)
  w.scalars(2, {'train/loss': 1.25})
  w.close()
  rows = [json.loads(l) for l in
          bucket.cat_file('gs://bkt/runs/m/metrics.jsonl').decode().splitlines()]
  assert [(r['step'], r['train/loss']) for r in rows] == [(1, 2.0), (2, 1.25)]


def test_checkpoint_manager_in_the_bucket(bucket):
  manager = checkpoints.make_manager('gs://bkt/runs/c', async_save=False)
  try:
    assert str(manager.directory) == 'gs://bkt/runs/c/checkpoints'
    assert bucket.isdir('gs://bkt/runs/c/checkpoints')
    assert manager.latest_step() is None
  finally:
    manager.close()


def test_init_from_in_the_bucket(bucket, tmp_path, monkeypatch):
  cache = tmp_path.parent / (tmp_path.name + '_cache')
  monkeypatch.setenv(paths.CACHE_ENV, str(cache))
  weights = {'blocks/0/w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  local = tmp_path.parent / (tmp_path.name + '_w.npz')
  np.savez(local, **weights)
  bucket.pipe_file('gs://bkt/weights/vit.npz', local.read_bytes())
  ckpt = pretrained.read_checkpoint('gs://bkt/weights/vit.npz')
  np.testing.assert_array_equal(ckpt.tensors['blocks/0/w'], weights['blocks/0/w'])
  with pytest.raises(FileNotFoundError, match="config.init_from='gs://bkt/weights/none.npz'"):
    pretrained.read_checkpoint('gs://bkt/weights/none.npz')


def test_tools_read_and_write_a_bucket_workdir(bucket):
  from ogfr_jax.tools import common  # pylint: disable=g-import-not-at-top
  from ogfr_jax.tools import plot_training  # pylint: disable=g-import-not-at-top
  from ogfr_jax.tools import reevaluate  # pylint: disable=g-import-not-at-top
  workdir = 'gs://bkt/runs/t'
  run_config.prepare_workdir(workdir, make_config({'seed': 3}))
  rows = [{'step': s, 'train/loss/total': 3.0 - s} for s in (1, 2, 3)]
  bucket.pipe_file(workdir + '/metrics.jsonl',
                   ''.join(json.dumps(r) + '\n' for r in rows).encode())
  assert common.workdir_config(workdir).seed == 3
  assert common.read_jsonl(workdir + '/metrics.jsonl') == rows
  out = plot_training.main(['--workdir', workdir])
  assert out == workdir + '/training.png'
  assert bucket.cat_file(out)[:8] == b'\x89PNG\r\n\x1a\n'
  png = common.save_png(np.zeros((4, 6, 3), np.uint8), workdir + '/figs/a.png')
  assert bucket.cat_file(png)[:4] == b'\x89PNG'
  common.write_json(workdir + '/figs/b.json', {'x': 1})
  assert json.loads(bucket.cat_file(workdir + '/figs/b.json')) == {'x': 1}
  assert reevaluate.default_out(workdir, [('eval.rerank', True)]) == (
      workdir + '/results_rerank-True.json')
  with pytest.raises(ValueError, match="run's own results.json"):
    reevaluate.main(['--workdir', workdir, '--out', workdir + '/results.json'])
  with pytest.raises(FileNotFoundError, match='gs://bkt/runs/t/checkpoints not found'):
    common.restore_state(workdir)
