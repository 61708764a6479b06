"""Bad input caught before or during training: dataset folders, names, images, batch sizes,
configs and workdirs, each refused with one line that names it. The faults of real training
processes are in tests/test_faults.py."""

import json
import logging as std_logging
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import dataset_fixtures as fx
from ogfr_jax.data import loading
from ogfr_jax import prefetch
from ogfr_jax import run_config
from ogfr_jax import train
from ogfr_jax.data import image_io
from ogfr_jax.data import pipeline
from ogfr_jax.data import sampler
from helpers import MARKET, make_config, run_main, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, 'tests', 'faults_child.py')


def test_missing_or_misnamed_dataset_folder_fails_before_anything_is_written(tmp_path):
  tree = fx.make_market1501(tmp_path)
  wd = tmp_path / 'wd'
  cases = [(tmp_path / 'no_such_folder', str(tmp_path / 'no_such_folder')),
           (tmp_path, f'(it exists under {tree.root}')]  # the root one level too high
  for root, named in cases:
    with pytest.raises(FileNotFoundError) as e:
      config = make_config({**MARKET, 'dataset.root': str(root)}, preset='synthetic',
                           cache=tmp_path / 'cache')
      train.train_and_evaluate(config, str(wd))
    assert named in str(e.value)
  (tree.root / 'bounding_box_train').rename(tree.root / 'bounding_box_training')
  with pytest.raises(FileNotFoundError) as e:
    config = make_config({**MARKET, 'dataset.root': str(tree.root)}, preset='synthetic',
                         cache=tmp_path / 'cache')
    train.train_and_evaluate(config, str(wd))
  assert f'expected folder {tree.root / "bounding_box_train"} is missing' in str(e.value)
  assert not wd.exists()


def test_corrupt_images_warned_about_are_the_ones_counted(tmp_path, caplog):
  """Batches read ahead and never used warn about nothing: every 'skipping corrupt training
  image' warning is one of the corrupt files counted in num_skipped."""
  tree = fx.make_market1501(tmp_path)
  config = make_config({**MARKET, 'dataset.root': str(tree.root)}, preset='synthetic',
                       cache=tmp_path / 'cache')
  config.input.corrupt_image_policy = 'skip'
  config.input.prefetch = 2
  train_data, _ = loading.load_data(config)
  it = pipeline.make_train_iterator(train_data.train, config)
  loader = it._loader  # pylint: disable=protected-access
  first, second = set(loader.global_indices(0).tolist()), loader.global_indices(1).tolist()
  bad = [i for i in second if i not in first][:2]  # read only for the second batch
  assert bad
  for i in bad:
    pathlib.Path(train_data.train.paths[i]).write_bytes(b'')
  source = prefetch.DevicePrefetcher(it, lambda b: b, size=2)
  with caplog.at_level(std_logging.WARNING):
    batch = next(source)
    wait_for(lambda: it.step >= 3, 30, 'the batches after the first to be read ahead')
    source.close()
  warned = [r.getMessage() for r in caplog.records
            if r.getMessage().startswith('skipping corrupt training image')]
  assert int(batch['num_skipped'].sum()) == source.num_skipped == 0
  assert warned == []
  # Consumed, they are warned about and counted, one warning per file replaced.
  it = pipeline.make_train_iterator(train_data.train, config)
  source = prefetch.DevicePrefetcher(it, lambda b: b, size=2)
  caplog.clear()
  with caplog.at_level(std_logging.WARNING):
    batches = [next(source) for _ in range(2)]
    source.close()
  warned = [r.getMessage() for r in caplog.records
            if r.getMessage().startswith('skipping corrupt training image')]
  counted = sum(int(b['num_skipped'].sum()) for b in batches)
  assert counted == source.num_skipped == len(warned) >= len(bad)
  assert {train_data.train.paths[i] for i in bad} <= {w.split(': ')[1] for w in warned}


def _gone(pid: int) -> bool:
  """True once `pid` has exited (a zombie that nobody reaps counts as exited)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] in ('Z', 'X')
  except FileNotFoundError:
    return True


def test_grain_workers_die_with_a_main_process_killed_by_sigkill(tmp_path):
  tree = fx.make_market1501(tmp_path)
  proc = subprocess.Popen([sys.executable, CHILD, 'workers', '--root', str(tree.root)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.startswith('WORKERS '), proc.stderr.read()[-3000:] if proc.poll() else line
    pids = json.loads(line[len('WORKERS '):])
    workers = pids['workers']
    assert len(workers) >= 2 and not any(_gone(p) for p in workers)
    proc.send_signal(signal.SIGKILL)  # what the OOM killer does: no clean-up in the parent
    proc.wait(timeout=30)
    # The workers and the resource tracker (which unlinks their shared memory once they are
    # gone) end by themselves within a few of the workers' parent checks.
    watched = workers + ([pids['tracker']] if pids['tracker'] else [])
    wait_for(lambda: all(_gone(p) for p in watched), 20, f'processes {watched} to end')
  finally:
    if proc.poll() is None:
      proc.kill()
    for pid in workers if 'workers' in locals() else []:
      if not _gone(pid):
        os.kill(pid, signal.SIGKILL)


def test_batch_not_divisible_by_the_devices_names_the_fields(tmp_path):
  config = make_config(preset='synthetic', cache=tmp_path / 'cache')
  config.input.ids_per_batch, config.input.images_per_id = 3, 2
  with pytest.raises(ValueError, match=r'config\.input\.ids_per_batch x config\.input\.'
                     r'images_per_id=6 is not divisible by the 8 devices'):
    train.setup(config, str(tmp_path / 'wd'))
  config = make_config(preset='synthetic', cache=tmp_path / 'cache')
  config.input.eval_batch_size = 12
  with pytest.raises(ValueError, match=r'config\.input\.eval_batch_size=12'):
    train.setup(config, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists() and not (tmp_path / 'cache').exists()
  # More identities per batch than the dataset has: named before the model is built.
  tree = fx.make_market1501(tmp_path)
  config = make_config({**MARKET, 'dataset.root': str(tree.root)}, preset='synthetic',
                       cache=tmp_path / 'cache')
  config.input.ids_per_batch, config.input.images_per_id = 8, 1
  with pytest.raises(ValueError, match=r'4 identities .*P = 8 distinct identities '
                     r'\(config\.input\.ids_per_batch\)'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()


def test_names_modes_and_small_identities_through_the_train_pipeline(tmp_path, monkeypatch,
                                                                      caplog):
  """Unparseable names are skipped with a warning; grayscale, RGBA, palette and 16-bit images
  are converted with a note; an identity with fewer than K images is drawn with replacement."""
  monkeypatch.setattr(image_io, '_noted_modes', set())
  monkeypatch.setattr(sampler, '_REPORTED_UNDER_K', set())
  tree = fx.make_market1501(tmp_path)
  train_dir = tree.root / 'bounding_box_train'
  originals = sorted(p for p in train_dir.glob('*.jpg') if not p.name.startswith('.'))
  # Identities 2 and 15 have exactly K = 2 images, so the first batch reads all four.
  modes = {originals[0]: 'L', originals[1]: 'P', originals[5]: 'RGBA', originals[6]: 'I;16'}
  for path, mode in modes.items():
    rgb = np.asarray(Image.open(path).convert('RGB'))
    if mode == 'I;16':
      img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode == 'RGBA':
      img = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), 'RGBA')
    else:
      img = Image.fromarray(rgb).convert(mode)
    path.unlink()
    img.save(path.with_suffix('.png'))
  config = make_config({**MARKET, 'dataset.root': str(tree.root)}, preset='synthetic',
                       cache=tmp_path / 'cache')
  with caplog.at_level(std_logging.INFO):
    train_data, _ = loading.load_data(config)
    it = pipeline.make_train_iterator(train_data.train, config)
    batch = next(it)
    it.close()
  assert 'IMG_0001.jpg' in caplog.text  # the unparseable query file, named in a warning
  for mode in ('L', 'RGBA', 'P', 'I;16'):
    assert f'converting images of mode {mode} to RGB' in caplog.text
  assert 'fewer than K=2 images' in caplog.text and 'with replacement' in caplog.text
  assert batch['image'].shape == (8, 32, 16, 3) and np.all(np.isfinite(batch['image']))
  single = train_data.train.pids[[i for i, p in enumerate(train_data.train.paths)
                                  if '0100_' in os.path.basename(p)][0]]
  rows = np.flatnonzero(batch['pid'] == single)
  assert rows.size == 2 and batch['index'][rows[0]] == batch['index'][rows[1]]


def test_unknown_dataset_and_policy_names_are_refused_before_the_workdir(tmp_path):
  proc = run_main('--config', 'configs/synthetic.py', '--workdir', tmp_path / 'wd',
               '--config.dataset.name=market', '--config.train.nonfinite_policy=ignore')
  assert proc.returncode != 0
  assert "config.dataset.name='market'" in proc.stderr and 'market1501' in proc.stderr
  assert not (tmp_path / 'wd').exists()
  with pytest.raises(ValueError, match=r'config\.train\.nonfinite_policy'):
    config = make_config(preset='synthetic', cache=tmp_path / 'cache')
    config.train.nonfinite_policy = 'ignore'
    run_config.validate(config)
