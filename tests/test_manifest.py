"""The run manifest: code version, packages, devices, seeds, host and times."""

import datetime
import importlib.metadata
import json
import os
import re
import subprocess

import jax

from ogfr_jax import config_defaults
from ogfr_jax import manifest


def _git(args, cwd):
  env = dict(os.environ, GIT_AUTHOR_NAME='t', GIT_AUTHOR_EMAIL='t@example.com',
             GIT_COMMITTER_NAME='t', GIT_COMMITTER_EMAIL='t@example.com')
  return subprocess.run(['git', *args], cwd=cwd, env=env, check=True, capture_output=True,
                        text=True).stdout.strip()


def test_fields_and_json(tmp_path):
  config = config_defaults.extend(config_defaults.base_config(), 'synthetic')
  config.seed, config.synthetic.seed = 7, 11
  m = manifest.run_manifest(config, wall_time_s=90.5)
  assert set(m) == {'git', 'packages', 'devices', 'seeds', 'hostname', 'argv', 'start_time',
                    'wall_time_s'}
  assert json.loads(json.dumps(m)) == m  # plain JSON, as results.json stores it
  assert m['seeds'] == {'seed': 7, 'synthetic.seed': 11}
  assert m['wall_time_s'] == 90.5
  for name in manifest.PACKAGES:
    assert m['packages'][name] == importlib.metadata.version(name)
  assert re.fullmatch(r'\d+\.\d+\.\d+', m['packages']['python'])
  assert m['devices']['device_count'] == jax.device_count()
  assert m['devices']['process_count'] == jax.process_count()
  assert m['devices']['device_kind'] == jax.devices()[0].device_kind
  assert m['hostname']
  start = datetime.datetime.fromisoformat(m['start_time'])
  age = datetime.datetime.now(datetime.timezone.utc) - start
  assert 85 <= age.total_seconds() <= 120  # started wall_time_s ago


def test_explicit_start_and_plain_dict_config():
  m = manifest.run_manifest({'seed': 3}, start_time=0.0)
  assert m['start_time'] == '1970-01-01T00:00:00+00:00'
  assert m['wall_time_s'] is None
  assert m['seeds'] == {'seed': 3}  # a config without the synthetic section


def test_git_state_of_a_checkout(tmp_path):
  repo = tmp_path / 'repo'
  pkg = repo / 'pkg'
  pkg.mkdir(parents=True)
  (pkg / '__init__.py').write_text('x = 1\n')
  _git(['init', '-q'], repo)
  _git(['add', 'pkg/__init__.py'], repo)
  _git(['commit', '-q', '-m', 'first'], repo)
  head = _git(['rev-parse', 'HEAD'], repo)
  assert manifest.git_state(str(pkg)) == {'commit': head, 'dirty': False}
  (repo / 'run_output.txt').write_text('untracked files do not make the tree dirty')
  assert manifest.git_state(str(pkg))['dirty'] is False
  (pkg / '__init__.py').write_text('x = 2\n')
  assert manifest.git_state(str(pkg)) == {'commit': head, 'dirty': True}
  # A folder below the checkout that git does not track is not "the sources" of it.
  stray = repo / 'venv' / 'site-packages' / 'pkg'
  stray.mkdir(parents=True)
  assert manifest.git_state(str(stray)) == {'commit': None, 'dirty': None}


def test_git_state_outside_git(tmp_path):
  assert manifest.git_state(str(tmp_path)) == {'commit': None, 'dirty': None}
  assert manifest.git_state(str(tmp_path / 'missing')) == {'commit': None, 'dirty': None}


def test_git_state_of_this_package():
  state = manifest.git_state()
  root = os.path.dirname(os.path.dirname(os.path.abspath(manifest.__file__)))
  assert re.fullmatch(r'[0-9a-f]{40}', state['commit'])
  assert state['commit'] == _git(['rev-parse', 'HEAD'], root)
  assert isinstance(state['dirty'], bool)
