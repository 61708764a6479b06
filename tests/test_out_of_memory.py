"""XLA's out-of-memory (RESOURCE_EXHAUSTED) ends a run with one line naming what to change.

The errors are real: XLA:CPU refuses an allocation larger than the machine (a 1 TiB buffer
in the unit tests; in the end-to-end run, the train step's temporaries at a 1024x512 input
with stride 4, 31,626 tokens, about 0.5 TB). The subprocess runs under an address-space limit
so that a machine that would grant such an allocation fails it all the same.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ogfr_jax import config_defaults
from ogfr_jax import out_of_memory

import dataset_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_out_of_memory() -> BaseException:
  try:
    jax.block_until_ready(jax.jit(lambda a: jnp.broadcast_to(a, (2**38,)) * 2)(jnp.float32(1)))
  except Exception as e:  # pylint: disable=broad-except
    return e
  pytest.fail('a 1 TiB buffer was allocated')


def test_message_names_the_settings_and_what_to_try():
  error = xla_out_of_memory()
  assert out_of_memory.is_out_of_memory(error)
  config = config_defaults.base_config()
  text = out_of_memory.message(config, error, platform='cpu')
  assert '\n' not in text
  for needle in ('RESOURCE_EXHAUSTED', 'train batch 64', 'input.ids_per_batch 16',
                 'input.images_per_id 4', 'eval batch 128', 'model.dtype=float32,',
                 'model.remat=none', '--config.model.dtype=bfloat16',
                 '--config.model.remat=dots or block', '--config.input.ids_per_batch=8',
                 '--config.input.eval_batch_size=64', 'benchmarks/memory_table.py'):
    assert needle in text, (needle, text)
  # Already at the least-memory settings: only the batch is left to change.
  config.model.dtype, config.model.remat = 'auto', 'block'
  text = out_of_memory.message(config, error, platform='tpu')
  assert 'model.dtype=bfloat16 (auto)' in text and 'model.remat=block' in text
  assert '--config.model.dtype' not in text and '--config.model.remat' not in text
  assert '--config.input.ids_per_batch=8' in text


def test_only_out_of_memory_is_translated():
  config = config_defaults.base_config()
  with pytest.raises(out_of_memory.OutOfMemoryError, match='model.remat=none') as e:
    with out_of_memory.as_user_error(lambda: config):
      raise xla_out_of_memory()
  assert isinstance(e.value, ValueError)  # main's one-line user errors
  with pytest.raises(RuntimeError, match='INTERNAL: something else'):
    with out_of_memory.as_user_error(lambda: config):
      raise RuntimeError('INTERNAL: something else')


# The child limits its own address space (16 GiB), then runs `python -m ogfr_jax.main`.
MAIN_UNDER_LIMIT = ('import resource, runpy; limit = 16 * 2**30; '
                    'resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); '
                    "runpy.run_module('ogfr_jax.main', run_name='__main__')")


def test_main_ends_an_out_of_memory_run_with_one_line(tmp_path):
  tree = fx.make_market1501(tmp_path)
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  proc = subprocess.run(
      [sys.executable, '-c', MAIN_UNDER_LIMIT,
       '--config', os.path.join(ROOT, 'configs', 'market1501.py') + ':runlocal',
       '--workdir', str(tmp_path / 'wd'), f'--config.dataset.root={tree.root}',
       '--config.input.height=1024', '--config.input.width=512', '--config.model.stride=4'],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith('error: out of device memory (RESOURCE_EXHAUSTED'), lines[-5:]
  for needle in ('train batch 8', 'model.dtype=float32 (auto)', 'model.remat=none',
                 '--config.model.dtype=bfloat16', '--config.input.ids_per_batch=2'):
    assert needle in lines[-1], (needle, lines[-1])
