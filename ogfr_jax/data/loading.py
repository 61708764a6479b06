"""The datasets of a run (config.dataset) and the schedule length they give.

`load_data` reads the training dataset and, for cross-domain protocols, the test dataset with
the registered readers (data/datasets.py); the synthetic benchmark is generated (and cached)
on first use. `schedule_lengths` turns the P x K sampler's epoch into step counts.
"""

from __future__ import annotations

import ml_collections

from ogfr_jax.data import datasets as datasets_lib
from ogfr_jax.data import pipeline
from ogfr_jax.data import synthetic
from ogfr_jax.data import validation


def read_dataset(config: ml_collections.ConfigDict, name: str, root: str, *,
                 merge_train_val: bool = False):
  """DatasetSplits of dataset `name` in folder `root` (the synthetic benchmark: generated
  into, or found in, its cache folder). Each reader owns its options: msmt17 merges list_val
  into training with merge_train_val, the others refuse it (they have no validation list)."""
  if name == 'synthetic':
    root = synthetic.ensure(synthetic.section(config), root or None)
  elif not root:
    raise ValueError(f'no folder given for dataset {name!r}: set config.dataset.root '
                     '(or config.dataset.test_root for the test dataset)')
  return datasets_lib.get_dataset(name, root, merge_train_val=merge_train_val,
                                  empty_images=config.input.corrupt_image_policy)


def load_data(config: ml_collections.ConfigDict):
  """Returns (train DatasetSplits, test DatasetSplits) per config.dataset. With
  dataset.val_ids the second is the validation split carved from the training identities
  (data/validation.py), which then also leave training."""
  d = config.dataset
  train = read_dataset(config, d.name, d.root, merge_train_val=bool(d.merge_train_val))
  if d.get('val_ids', 0):
    occluded = None
    if d.name == 'synthetic':
      occluded = {name for name, info in synthetic.load_side_info(train.root, ('train',)).items()
                  if info['occluder_type'] is not None}
    return validation.carve(train, int(d.val_ids), occluded)
  if d.test_name and d.test_name != d.name:
    return train, read_dataset(config, d.test_name, d.test_root)
  return train, train


def schedule_lengths(config: ml_collections.ConfigDict, train_split) -> tuple[int, int]:
  """(steps per epoch, total steps)."""
  steps_per_epoch = pipeline.steps_per_epoch(train_split, config)  # honours train.steps_per_epoch
  if steps_per_epoch < 1:
    raise ValueError(
        f'the training split has too few identities/images for one batch of '
        f'{config.input.ids_per_batch} x {config.input.images_per_id}')
  return steps_per_epoch, int(config.train.epochs * steps_per_epoch)
