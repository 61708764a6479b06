"""grain's worker processes leave no shared memory behind.

Batches from the workers arrive in /dev/shm blocks; those still referenced when the
interpreter exits used to outlive grain's deletion pool, and the resource tracker warned
"There appear to be 50 leaked shared_memory objects" at the end of every run with
input.num_workers > 0. The pipeline now copies each batch out of shared memory on receipt
and, at exit, frees what grain leaves in reference cycles before that pool stops.
"""

import os
import subprocess
import sys

import numpy as np
from grain._src.python.ipc import shared_memory_array

from ogfr_jax import config_defaults
from ogfr_jax.data import datasets
from ogfr_jax.data import pipeline

import dataset_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEAK_WARNING = 'leaked shared_memory'


def test_worker_batches_hold_no_shared_memory(tmp_path):
  tree = fx.make_market1501(tmp_path)
  split = datasets.get_dataset('market1501', str(tree.root)).train
  config = config_defaults.base_config()
  config.input.height, config.input.width = 64, 32
  config.input.ids_per_batch, config.input.images_per_id = 2, 2
  config.input.num_workers, config.input.prefetch = 2, 1
  it = pipeline.make_train_iterator(split, config)
  try:
    batches = [next(it) for _ in range(3)]
  finally:
    it.close()
  for batch in batches:
    for key, value in batch.items():
      assert not isinstance(value, shared_memory_array.SharedMemoryArray), key
      assert isinstance(value, np.ndarray) and value.base is None, key


# An evaluation iterator read to its end by two workers, then the interpreter exits.
EVAL_TO_THE_END = '''
import sys
from ogfr_jax import config_defaults
from ogfr_jax.data import datasets, pipeline
if __name__ == '__main__':
  c = config_defaults.base_config()
  c.input.height, c.input.width, c.input.eval_batch_size = 64, 32, 4
  c.input.num_workers, c.input.prefetch = 2, 2
  split = datasets.get_dataset('market1501', sys.argv[1]).gallery
  print(sum(1 for _ in pipeline.make_eval_iterator(split, c)), 'batches')
'''


def test_exhausted_eval_iterator_leaks_nothing(tmp_path):
  tree = fx.make_market1501(tmp_path)
  script = tmp_path / 'eval_to_the_end.py'
  script.write_text(EVAL_TO_THE_END)
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, str(script), str(tree.root)], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[-2:] == ['2', 'batches'], proc.stdout
  assert LEAK_WARNING not in proc.stderr, proc.stderr[-3000:]


def test_training_with_workers_leaks_nothing(tmp_path):
  tree = fx.make_market1501(tmp_path)
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  proc = subprocess.run(
      [sys.executable, '-m', 'ogfr_jax.main',
       '--config', os.path.join(ROOT, 'configs', 'market1501.py') + ':runlocal',
       '--workdir', str(tmp_path / 'wd'), f'--config.dataset.root={tree.root}',
       '--config.input.num_workers=2', '--config.input.height=64', '--config.input.width=32'],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / 'wd' / 'results.json').exists()
  assert LEAK_WARNING not in proc.stderr, proc.stderr[-3000:]
