"""Damaged, foreign and unwritable checkpoints, injected into small states (no training).

The training-level versions of these faults (a damaged step under a real run, a workdir whose
config.json went missing) are in tests/test_faults.py.
"""

import errno
import logging as std_logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import atomicity

from ogfr_jax import checkpoints
from ogfr_jax import config_defaults
from ogfr_jax.data import records
from ogfr_jax.data import synthetic


def _state(seed: int = 0) -> dict:
  # Random floats do not compress: zstd stores them as raw blocks, where flipped bytes decode
  # without any error (what makes bit flips silent without checksums).
  key = jax.random.PRNGKey(seed)
  return {'params': {'w': jax.random.normal(key, (256, 256)), 'b': jnp.arange(7.0)},
          'opt': (jnp.ones((5, 3), jnp.bfloat16), jnp.array([True, False])),
          'step': jnp.int32(seed), 'rng': jax.random.PRNGKey(seed + 1)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _write(workdir, steps=(2, 4), **kw) -> dict:
  manager = checkpoints.make_manager(str(workdir), max_to_keep=5, **kw)
  states = {}
  for step in steps:
    states[step] = _state(step)
    checkpoints.save(manager, step, states[step], {'step': step}, force=True)
  manager.close()
  return states


def _steps(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


def _data_files(workdir, step) -> list[str]:
  folder = os.path.join(workdir, 'checkpoints', str(step), 'state', 'ocdbt.process_0', 'd')
  return sorted((os.path.join(folder, n) for n in os.listdir(folder)), key=os.path.getsize)


def _plain_restore(workdir, step, abstract):
  """Orbax alone, without the checks of ogfr_jax.checkpoints."""
  manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={'state': ocp.StandardCheckpointHandler()})
  try:
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
  finally:
    manager.close()


def test_checksums_do_not_depend_on_the_sharding_and_see_every_bit():
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 6))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('a', 'b'))
  spread = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      'a', 'b')))
  assert checkpoints.state_checksums({'x': x}) == checkpoints.state_checksums({'x': spread})
  bits = np.asarray(x).view(np.uint32)
  base = checkpoints.state_checksums({'x': x})['x']
  for flat, bit in ((0, 0), (17, 31), (47, 12)):
    flipped = bits.copy().reshape(-1)
    flipped[flat] ^= np.uint32(1 << bit)
    changed = checkpoints.state_checksums({'x': jnp.asarray(flipped.view(np.float32)
                                                            .reshape(8, 6))})['x']
    assert changed != base, (flat, bit)
  # Swapping two elements keeps every value, not the positions.
  swapped = np.asarray(x).copy()
  swapped[0, 0], swapped[0, 1] = swapped[0, 1], swapped[0, 0]
  assert checkpoints.state_checksums({'x': jnp.asarray(swapped)})['x'] != base


def test_host_checksums_of_the_shards_equal_the_device_checksums():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('a', 'b'))
  named = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  key = jax.random.PRNGKey(5)
  state = {
      'f32': jax.device_put(jax.random.normal(key, (8, 6)), named('a', 'b')),
      'f32_rows': jax.device_put(jax.random.normal(key, (8, 3, 2)), named('a')),
      'replicated': jax.device_put(jnp.arange(7, dtype=jnp.int32), named()),
      'bf16': jax.device_put(jax.random.normal(key, (4, 6)).astype(jnp.bfloat16),
                             named(None, 'b')),
      'u32': jnp.asarray(np.arange(6, dtype=np.uint32) * np.uint32(0x9E3779B9)),
      'flag': jnp.asarray([True, False, True]),
      'scalar': jnp.float32(2.5),
      'key': jax.random.key(3),
  }
  assert (checkpoints.state_checksums(state, on_host=True)
          == checkpoints.state_checksums(state, on_host=False))


def test_bit_flips_in_the_newest_step_are_detected_and_it_is_set_aside(tmp_path):
  wd = str(tmp_path / 'wd')
  states = _write(wd)
  path = _data_files(wd, 4)[-1]  # the random 256 x 256 floats
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))
  # The premise: orbax alone restores the damaged step without complaint, values changed.
  raw = _plain_restore(wd, 4, _abstract(states[4]))
  changed = int(np.sum(np.asarray(raw['params']['w']) != np.asarray(states[4]['params']['w'])))
  assert changed > 0

  manager = checkpoints.make_manager(wd)
  state, data_state, step = checkpoints.restore_newest(manager, _abstract(states[4]))
  manager.close()
  assert step == 2 and data_state == {'step': 2}
  np.testing.assert_array_equal(state['params']['w'], states[2]['params']['w'])
  # Moved aside whole, never deleted.
  assert _steps(wd) == ['2', 'corrupt-4']
  assert open(os.path.join(wd, 'checkpoints', 'corrupt-4', os.path.relpath(
      path, os.path.join(wd, 'checkpoints', '4'))), 'rb').read() == bytes(data)


@pytest.mark.parametrize('damage', ['removed data file', 'truncated data file',
                                    'missing _METADATA'])
def test_damaged_newest_step_falls_back_or_is_refused(tmp_path, damage):
  wd = str(tmp_path / 'wd')
  states = _write(wd, steps=(2, 4, 6))
  step_dir = os.path.join(wd, 'checkpoints', '6')
  if damage == 'missing _METADATA':
    os.remove(os.path.join(step_dir, 'state', '_METADATA'))
  else:
    path = _data_files(wd, 6)[-1]
    if damage == 'removed data file':
      os.remove(path)
    else:
      open(path, 'r+b').truncate(100)
  pristine = sorted(os.walk(step_dir))

  config = config_defaults.base_config()
  config.train.damaged_checkpoint = 'refuse'
  manager = checkpoints.make_manager(wd, config=config)
  with pytest.raises(checkpoints.DamagedCheckpoint) as e:
    checkpoints.restore_newest(manager, _abstract(states[6]))
  manager.close()
  text = str(e.value)
  assert text.startswith(f'checkpoint {step_dir} (step 6) is damaged: ')
  assert 'config.train.damaged_checkpoint=fall_back' in text and '\n' not in text
  assert isinstance(e.value, ValueError) and e.value.__cause__ is None
  assert sorted(os.walk(step_dir)) == pristine  # refused: nothing moved

  config.train.damaged_checkpoint = 'fall_back'
  manager = checkpoints.make_manager(wd, config=config)
  state, _, step = checkpoints.restore_newest(manager, _abstract(states[6]))
  assert step == 4
  np.testing.assert_array_equal(state['opt'][0], states[4]['opt'][0])
  # The set-aside step is forgotten by the manager: new saves and max_to_keep leave it alone.
  checkpoints.save(manager, 6, states[6], {'step': 6}, force=True)
  manager.close()
  assert _steps(wd) == ['4', '6', 'corrupt-6']  # max_to_keep=2 dropped step 2 only
  manager = checkpoints.make_manager(wd)
  assert checkpoints.restore_newest(manager, _abstract(states[6]))[2] == 6
  manager.close()


def test_every_step_damaged_is_an_error_and_the_next_run_starts_afresh(tmp_path):
  wd = str(tmp_path / 'wd')
  states = _write(wd, steps=(2,))
  os.remove(os.path.join(wd, 'checkpoints', '2', 'state', '_METADATA'))
  manager = checkpoints.make_manager(wd)
  with pytest.raises(ValueError, match=r'no checkpoint in .* restores; the damaged ones were '
                     r'set aside \(2 -> .*corrupt-2\)'):
    checkpoints.restore_newest(manager, _abstract(states[2]))
  assert checkpoints.restore_newest(manager, _abstract(states[2])) == (None, None, 0)
  manager.close()


def _split(names) -> records.Split:
  return records.Split(paths=[f'/data/{n}' for n in names], pids=np.arange(len(names)),
                       camids=np.zeros(len(names), np.int32))


def test_checkpoint_of_another_config_or_dataset_is_refused_whatever_sits_beside_it(
    tmp_path, monkeypatch):
  wd = str(tmp_path / 'wd')
  config = config_defaults.base_config()
  config.train.epochs = 4
  states = _write(wd, steps=(2,), config=config, train_split=_split(['a.jpg', 'b.jpg']))
  cases = [('train.epochs', 5, _split(['a.jpg', 'b.jpg']), 'train.epochs: 4 -> 5'),
           ('train.log_every', 7, _split(['a.jpg', 'c.jpg']), 'data.train_files: '),
           ('generator', synthetic.GENERATOR_VERSION + '.1', _split(['a.jpg', 'b.jpg']),
            f"data.generator_version: '{synthetic.GENERATOR_VERSION}' -> "
            f"'{synthetic.GENERATOR_VERSION}.1'")]
  for field, value, split, named in cases:
    other = config_defaults.base_config()
    other.train.epochs = 4
    if field == 'generator':
      monkeypatch.setattr(synthetic, 'GENERATOR_VERSION', value)
    else:
      section, name = field.split('.')
      other[section][name] = value
    manager = checkpoints.make_manager(wd, config=other, train_split=split)
    with pytest.raises(checkpoints.CheckpointMismatch) as e:
      checkpoints.restore_newest(manager, _abstract(states[2]))
    manager.close()
    assert f'the checkpoint in {wd} (step 2) was written by a run of another config' in str(
        e.value)
    assert named in str(e.value)
    assert _steps(wd) == ['2']  # another run's checkpoint is never set aside
  # A resumable field (logging) may differ.
  other = config_defaults.base_config()
  other.train.epochs, other.train.log_every = 4, 7
  monkeypatch.undo()
  manager = checkpoints.make_manager(wd, config=other, train_split=_split(['a.jpg', 'b.jpg']))
  assert checkpoints.restore_newest(manager, _abstract(states[2]))[2] == 2
  manager.close()


def test_disk_full_in_a_checkpoint_write_is_one_line_and_keeps_the_last_good_one(
    tmp_path, monkeypatch):
  wd = str(tmp_path / 'wd')
  manager = checkpoints.make_manager(wd)
  checkpoints.save(manager, 2, _state(2), {'step': 2}, force=True)
  manager.wait_until_finished()
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def no_space(self):
    if self.get_final().name == '4':
      raise OSError(errno.ENOSPC, 'No space left on device', str(self.get_final()))
    return await finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', no_space)
  checkpoints.save(manager, 4, _state(4), {'step': 4}, force=True)  # the write is async
  with pytest.raises(checkpoints.CheckpointWriteError) as e:
    manager.wait_until_finished()
  text = str(e.value)
  folder = os.path.join(wd, 'checkpoints')
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(_state(4))
               if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended))
  assert text.startswith(f'no space left on device writing the checkpoint of step 4 to '
                         f'{folder}/4 (it needs about {nbytes / 2**20:.1f} MB, ')
  assert f'the last good checkpoint, step 2, is kept in {folder}' in text and '\n' not in text
  assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
  manager.close()  # reported once: closing does not raise it again
  manager = checkpoints.make_manager(wd)
  assert checkpoints.restore_newest(manager, _abstract(_state(2)))[2] == 2
  manager.close()
  # A synchronous failure at the start of a write reads the same.
  manager = checkpoints.make_manager(wd)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', lambda *a, **k: (_ for _ in ()).throw(
      OSError(errno.ENOSPC, 'No space left on device')))
  with pytest.raises(checkpoints.CheckpointWriteError, match='no space left on device writing '
                     'the checkpoint of step 6 .*step 2, is kept'):
    checkpoints.save(manager, 6, _state(6), {'step': 6})
  manager.close()
  shutil.rmtree(wd)


def test_checkpoint_without_integrity_record_is_used_with_a_warning_or_refused(tmp_path,
                                                                               caplog):
  """A step written before checksums existed (here: its integrity item removed) is still
  resumed from, with a warning that says what was not verified; under 'refuse' it is refused,
  with nothing moved."""
  wd = str(tmp_path / 'wd')
  states = _write(wd, steps=(2,))
  shutil.rmtree(os.path.join(wd, 'checkpoints', '2', 'integrity'))
  config = config_defaults.base_config()
  config.train.damaged_checkpoint = 'refuse'
  manager = checkpoints.make_manager(wd, config=config)
  with pytest.raises(checkpoints.UnverifiedCheckpoint) as e:
    checkpoints.restore_newest(manager, _abstract(states[2]))
  manager.close()
  text = str(e.value)
  assert text.startswith(f'checkpoint {wd}/checkpoints/2 (step 2) has no integrity record '
                         '(written before checksums existed')
  assert 'its arrays are not checked against checksums' in text and '\n' not in text
  assert '--config.train.damaged_checkpoint=fall_back' in text
  assert _steps(wd) == ['2']

  config.train.damaged_checkpoint = 'fall_back'
  manager = checkpoints.make_manager(wd, config=config)
  with caplog.at_level(std_logging.WARNING):
    state, _, step = checkpoints.restore_newest(manager, _abstract(states[2]))
  manager.close()
  assert step == 2
  np.testing.assert_array_equal(state['params']['w'], states[2]['params']['w'])
  (warning,) = [r for r in caplog.records if r.levelno == std_logging.WARNING]
  for what in ('no integrity record', 'arrays are not checked against checksums',
               'nor its input state', 'nor the config and training data it was written with',
               'damaged_checkpoint=refuse refuses'):
    assert what in warning.getMessage(), what


def test_a_manager_that_only_checks_writes_nothing(tmp_path):
  wd = tmp_path / 'wd'
  manager = checkpoints.make_manager(str(wd), writable=False)
  assert manager.all_steps() == [] and manager.latest_step() is None
  manager.close()
  assert not wd.exists()
  # Nor does it clean up what a killed run left: only a run that goes on does.
  _write(str(wd), steps=(2,))
  leftover = wd / 'checkpoints' / '4.orbax-checkpoint-tmp'
  leftover.mkdir()
  manager = checkpoints.make_manager(str(wd), writable=False)
  assert manager.all_steps() == [2]
  time.sleep(0.5)  # the clean-up of a writable manager runs in a thread, done by then
  manager.close()
  assert leftover.is_dir()
  manager = checkpoints.make_manager(str(wd))
  deadline = time.time() + 10
  while leftover.exists() and time.time() < deadline:
    time.sleep(0.05)
  manager.close()
  assert not leftover.exists()
