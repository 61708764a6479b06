"""Named backbone weights that are built on this machine: config.init_from='synthetic_source'.

Real recipes start both branches from ImageNet weights, so the teacher is a teacher from its
first step. The tiny ViT of the synthetic benchmark has no such weights; their stand-in is a
student trained on a disjoint synthetic world (configs/synthetic_source.py). Like the
benchmark itself it is built on first use and cached: the source run's workdir and its
exported student go to <cache>/pretrained/<name>-<hash>/ ($OGFR_JAX_CACHE or ~/.cache/ogfr_jax),
the hash covering the source run's training fields (`training_fields`) and the synthetic
generator version. Later runs read the
file directly; the run header's weights line names the source and the cached file. The
build runs `ogfr_jax.main` and `ogfr_jax.tools.convert` in subprocesses,
under a file lock, and renames the weights into place only when the export is complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

from ogfr_jax import console
from ogfr_jax.data import synthetic
from ogfr_jax.data import synthetic_cache

# name -> config file under configs/ that trains it.
NAMED = {'synthetic_source': 'synthetic_source.py'}
WEIGHTS_FILE = 'student.safetensors'
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def is_named(init_from: str) -> bool:
  return str(init_from) in NAMED


def _config_path(name: str) -> str:
  path = os.path.join(_CONFIGS, NAMED[name])
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.init_from={name!r} is built by {path}, which is missing '
                            '(run from a checkout of the repository)')
  return path


def source_config(name: str):
  path = _config_path(name)
  spec = importlib.util.spec_from_file_location(f'ogfr_source_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def training_fields(config) -> dict:
  """The fields of a student-only source run that its weights depend on. Not the whole
  config: a field added elsewhere (an evaluator, an FEPM option) must not force a rebuild."""
  c = json.loads(config.to_json_best_effort())
  loss = {k: v for k, v in c['loss'].items()
          if k.startswith(('id_', 'label_', 'triplet_', 'student_'))}
  optim = {k: v for k, v in c['optim'].items() if not k.startswith('agent_')}
  return {'seed': c['seed'], 'epochs': c['train']['epochs'], 'loss': loss, 'optim': optim,
          **{k: c[k] for k in ('synthetic', 'model', 'input', 'occlusion')}}


def folder(name: str, cache_dir: str | None = None) -> str:
  """The cache folder of `name` for the current source config and generator version."""
  blob = json.dumps({'config': training_fields(source_config(name)),
                     'generator_version': synthetic.GENERATOR_VERSION}, sort_keys=True)
  key = hashlib.sha256(blob.encode()).hexdigest()[:16]
  base = cache_dir or os.path.dirname(synthetic.default_cache_dir())
  return os.path.join(base, 'pretrained', f'{name}-{key}')


def resolve(init_from: str, cache_dir: str | None = None) -> str:
  """The weights file of config.init_from: a named source's cached file (built when missing),
  else init_from itself."""
  if not is_named(init_from):
    return init_from
  where = folder(init_from, cache_dir)
  weights = os.path.join(where, WEIGHTS_FILE)
  if os.path.isfile(weights):
    return weights
  os.makedirs(where, exist_ok=True)
  with synthetic_cache._file_lock(os.path.join(where, '.lock')):  # pylint: disable=protected-access
    if not os.path.isfile(weights):
      build(init_from, where)
  return weights


def build(name: str, where: str) -> None:
  """Trains the source config into WHERE/workdir (resuming an interrupted build; a finished
  one, with its results.json, is kept) and exports its student to WHERE/student.safetensors."""
  workdir = os.path.join(where, 'workdir')
  log = os.path.join(where, 'build.log')
  console.say(f'config.init_from={name!r}: building the weights once into '
              f'{console.short_path(where)} (configs/{NAMED[name]}; log: build.log)')
  env = dict(os.environ)
  repo = os.path.dirname(_CONFIGS)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (repo, env.get('PYTHONPATH', '')) if p)
  tmp = os.path.join(where, f'.student.tmp.{os.getpid()}.safetensors')
  cmds = [[sys.executable, '-m', 'ogfr_jax.tools.convert', '--export_student', workdir,
           '--output', tmp, '--overwrite']]
  if not os.path.isfile(os.path.join(workdir, 'results.json')):  # the source run is finished
    cmds.insert(0, [sys.executable, '-m', 'ogfr_jax.main', '--config', _config_path(name),
                    '--workdir', workdir])
  with open(log, 'a') as out:
    for cmd in cmds:
      done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
      if done.returncode:
        raise OSError(f'building config.init_from={name!r} failed (exit status '
                           f'{done.returncode}); see {log}')
  os.replace(tmp, os.path.join(where, WEIGHTS_FILE))
