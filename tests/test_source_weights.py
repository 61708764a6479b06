"""Named, cached backbone weights (config.init_from='synthetic_source')."""

import os

import pytest

from ogfr_jax import config_defaults
from ogfr_jax import config_schema
from ogfr_jax import source_weights


@pytest.fixture
def builds(monkeypatch):
  calls = []

  def fake_build(name, where):
    calls.append((name, where))
    with open(os.path.join(where, source_weights.WEIGHTS_FILE), 'wb') as f:
      f.write(b'weights')

  monkeypatch.setattr(source_weights, 'build', fake_build)
  return calls


def test_named_source_is_built_once_and_then_read_from_the_cache(tmp_path, builds):
  first = source_weights.resolve('synthetic_source', str(tmp_path))
  again = source_weights.resolve('synthetic_source', str(tmp_path))
  assert first == again and os.path.isfile(first)
  assert len(builds) == 1
  assert first.startswith(os.path.join(str(tmp_path), 'pretrained', 'synthetic_source-'))


def test_cache_folder_follows_the_source_config(monkeypatch):
  before = source_weights.folder('synthetic_source', '/c')
  real = source_weights.source_config

  def changed(name):
    c = real(name)
    c.train.epochs += 1
    return c

  monkeypatch.setattr(source_weights, 'source_config', changed)
  assert source_weights.folder('synthetic_source', '/c') != before


def test_cache_folder_ignores_fields_a_student_only_run_does_not_read(monkeypatch):
  before = source_weights.folder('synthetic_source', '/c')
  real = source_weights.source_config

  def changed(name):
    c = real(name)
    c.fepm.random_fraction += 0.1
    c.loss.kd_weight += 1.0
    c.train.log_every += 1
    return c

  monkeypatch.setattr(source_weights, 'source_config', changed)
  assert source_weights.folder('synthetic_source', '/c') == before


def test_paths_pass_through_and_unknown_names_are_paths(tmp_path):
  assert source_weights.resolve('/w/vit.npz') == '/w/vit.npz'
  assert not source_weights.is_named('synthetic')
  c = config_defaults.base_config()
  c.init_from = 'synthetic_sourc'
  with pytest.raises(ValueError, match='config.init_from'):
    config_schema.validate(c)
  c.init_from = 'synthetic_source'
  config_schema.validate(c)  # a name, built on first use: not a missing file


def test_header_names_the_source_and_its_cached_file():
  from ogfr_jax import pretrained  # pylint: disable=g-import-not-at-top
  report = pretrained.ImportReport('/c/pretrained/synthetic_source-x/student.safetensors',
                                    'safetensors', 'timm/TransReID names', ('student_vit',), [])
  config = config_defaults.base_config()
  config.init_from = 'synthetic_source'
  [line] = pretrained.header_lines(report, config)
  assert line.startswith('weights: synthetic_source (cached: /c/pretrained/synthetic_source-x/'
                         'student.safetensors) (safetensors, timm/TransReID names): 0 loaded')
