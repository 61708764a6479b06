"""What the command-line tools share: a trained run read back from its workdir.

A workdir written by training holds config.json and orbax checkpoints of the train state. The
tools need the student for inference (and the teacher's agent for the purification figures),
but not the optimizer, the mesh of the training run, or the training set: the sizes of the ID
classifier and of the camera table are read from the checkpointed parameters themselves, so
a model trained on a dataset that is no longer on disk can still extract features.

Argument parsing is argparse (not absl flags) so that several tools can be imported into one
process, e.g. a test that calls each tool's `main(argv)`; every multi-word option accepts both
spellings, `--num-queries` and `--num_queries`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from ogfr_jax import config_schema
from ogfr_jax import paths

# Top-level parameter names that hold the student's backbone (see models/ogfr.py).
_STUDENT_BACKBONES = ('student_vit', 'vit')


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json as a ConfigDict (the resolved config of the training run)."""
  path = paths.join(paths.resolve(workdir, '--workdir'), 'config.json')
  if not paths.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a training workdir? (pass the '
                            "run's config explicitly where the tool allows it)")
  try:
    values = json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e
  try:
    # Onto the base config: fields added since the run was written read as their defaults.
    return config_schema.from_json(values)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e


def restore_state(workdir: str, step: Optional[int] = None) -> tuple[dict[str, Any], int]:
  """The train state saved in WORKDIR/checkpoints (latest step unless `step`), as numpy trees.

  Returns ({'params': ..., 'batch_stats': ...}, step). The orbax 'state' item is read
  directly onto the host CPU from its own metadata, so neither the dataset nor the device
  layout of the training run is needed.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = paths.join(paths.resolve(workdir, '--workdir'), 'checkpoints')
  if not paths.isdir(directory):
    raise FileNotFoundError(f'{directory} not found: is {workdir} a training workdir?')
  # Naming the handlers lets orbax read the items' metadata before anything is restored; an
  # item of the step without a handler (the 'integrity' record) would be warned about.
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler(),
                     'integrity': ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {directory}')
    if step not in manager.all_steps():
      raise FileNotFoundError(f'no checkpoint of step {step} in {directory} (saved steps: '
                              f'{sorted(manager.all_steps())})')
    meta = manager.item_metadata(step)['state']
    meta = getattr(meta, 'tree', meta)
    if not meta or 'params' not in meta:
      raise ValueError(f'{directory}/{step} has no readable train state')
    cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
    # Only the parameters and BN statistics: the optimizer state can be as large as the
    # parameters again and no tool needs it.
    wanted = {k: meta[k] for k in ('params', 'batch_stats') if k in meta}
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                          wanted)
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=cpu), target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args, partial_restore=True)))['state']
  finally:
    manager.close()
  out = {k: jax.tree.map(np.asarray, dict(restored[k])) for k in restored}
  out.setdefault('batch_stats', {})
  return out, int(step)


def model_sizes(params: dict[str, Any]) -> tuple[int, int]:
  """(num_classes, num_cameras) of a trained OGFR, read from its parameter shapes.

  num_classes is the width of the student's ID classifier; num_cameras the rows of the
  student's SIE table (1 when the model has no camera embedding, the size the model builds).
  """
  try:
    num_classes = int(np.shape(params['student_head']['classifier']['kernel'])[-1])
  except KeyError as e:
    raise ValueError(f'the checkpoint has no student ID classifier (student_head/classifier/'
                     f'kernel); top-level parameters: {sorted(params)}') from e
  num_cameras = 1
  for name in _STUDENT_BACKBONES:
    if name in params and 'sie_embed' in params[name]:
      num_cameras = int(np.shape(params[name]['sie_embed'])[0])
  return num_classes, num_cameras


def student_backbone_name(params: dict[str, Any]) -> str:
  for name in _STUDENT_BACKBONES:
    if name in params:
      return name
  raise ValueError(f'no student backbone in the parameters (top-level names: {sorted(params)})')


@dataclasses.dataclass
class TrainedModel:
  """A trained OGFR on the host: config, Flax module and its variables."""
  config: ml_collections.ConfigDict
  model: Any  # ogfr_jax.models.ogfr.OGFR
  variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...} (numpy)
  step: int
  num_classes: int
  num_cameras: int
  workdir: str

  @property
  def params(self) -> dict[str, Any]:
    return self.variables['params']


def load_trained(workdir: str, step: Optional[int] = None,
                 config: Optional[ml_collections.ConfigDict] = None) -> TrainedModel:
  """The model of a training workdir at its latest (or the given) checkpoint."""
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  config = workdir_config(workdir) if config is None else config
  state, step = restore_state(workdir, step)
  num_classes, num_cameras = model_sizes(state['params'])
  model = build.build_model(config, num_classes, num_cameras)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return TrainedModel(config=config, model=model, variables=variables, step=step,
                      num_classes=num_classes, num_cameras=num_cameras,
                      workdir=paths.resolve(workdir, '--workdir'))


def local_mesh():
  """A data-parallel mesh over this process's devices (the training run's mesh may need
  devices that the machine running a tool does not have)."""
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  return parallel.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}))


def round_batch(batch_size: int, num_devices: int) -> int:
  """The smallest multiple of the device count that is >= batch_size (sharded batches)."""
  if batch_size < 1:
    raise ValueError(f'--batch-size must be >= 1, got {batch_size}')
  return -(-batch_size // num_devices) * num_devices


def read_split(config: ml_collections.ConfigDict, which: str, root: str = ''):
  """DatasetSplits of the run's training ('train') or test ('test') dataset.

  Like data.loading.load_data but reads only the dataset that is asked for, so that the test set
  can be used on a machine without the training set (cross-domain protocols). `root`
  replaces the folder recorded in the config (datasets move between machines).
  """
  from ogfr_jax.data import loading  # pylint: disable=g-import-not-at-top
  d = config.dataset
  if which == 'test' and d.test_name and d.test_name != d.name:
    return loading.read_dataset(config, d.test_name, root or d.test_root)
  if which in ('train', 'test'):
    return loading.read_dataset(config, d.name, root or d.root,
                                merge_train_val=bool(d.merge_train_val))
  raise ValueError(f"which={which!r}: use 'train' or 'test'")


def to_uint8(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Undoes `augment.normalize`: float32 [..., 3] model input -> uint8 pixels. uint8 input
  is already pixels (what the pipeline yields) and is returned as it is."""
  if np.asarray(image).dtype == np.uint8:
    return np.asarray(image)
  x = np.asarray(image, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Lines of a metrics.jsonl; a line cut short by a crash at the end is skipped."""
  if not paths.exists(path) or paths.isdir(path):
    raise FileNotFoundError(f'{path} not found: the run has logged no metrics yet')
  rows = []
  lines = paths.read_text(path).splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        break  # an interrupted write; everything before it is intact
      raise ValueError(f'{path}:{i + 1} is not valid JSON: {e}') from e
  return rows


class ArgumentParser(argparse.ArgumentParser):
  """argparse that accepts '-' and '_' in option names and reports errors as ValueError
  when used in-process (tools' `main(argv)`), so a caller sees the message, not SystemExit."""

  def add(self, name: str, **kwargs) -> None:
    """Adds --name with both spellings (--num-queries, --num_queries)."""
    dash, under = '--' + name.replace('_', '-'), '--' + name.replace('-', '_')
    names = [dash] if dash == under else [dash, under]
    kwargs.setdefault('dest', name.replace('-', '_'))
    self.add_argument(*names, **kwargs)

  def error(self, message: str):
    raise UsageError(f'{self.prog}: {message}')


class UsageError(ValueError):
  """A bad command line."""


def replicate(variables: Any, mesh) -> Any:
  """Puts the variables on every device of `mesh` once, instead of once per jitted call."""
  import jax  # pylint: disable=g-import-not-at-top
  from ogfr_jax import parallel  # pylint: disable=g-import-not-at-top
  return jax.device_put(variables, parallel.replicated(mesh))


# --------------------------------------------------------------------------------------------
# Output files


def save_png(image: np.ndarray, path: str, colors: int = 0) -> str:
  """Writes an RGB PNG; with `colors` (2..256) an adaptive palette of that many colours, which
  makes figures of noisy photographs several times smaller (for documentation)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(image)
  if colors:
    if not 2 <= colors <= 256:
      raise ValueError(f'--colors must be 0 (full colour) or in [2, 256], got {colors}')
    img = img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                       dither=Image.Dither.NONE)
  buffer = io.BytesIO()
  img.save(buffer, format='PNG', optimize=True)
  write_file(path, buffer.getvalue())
  return path


def write_file(path: str, data: bytes) -> str:
  """Writes an output file of a tool, creating its folder; local or on an object store."""
  path = paths.resolve(path, 'output')
  paths.makedirs(os.path.dirname(path))
  paths.write_bytes(path, data)
  return path


def write_json(path: str, value: Any) -> str:
  return write_file(path, json.dumps(value, indent=2).encode())
