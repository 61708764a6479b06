"""A validation split carved from the training identities (config.dataset.val_ids).

Recipe choices (loss weights, schedules, initialisation) must not be made on the test split.
`carve` holds out `num_ids` training identities, spread evenly over the sorted training ids:
they leave the training split (the rest are relabelled 0..N-1 again) and become the query
and gallery of the run's evaluation. Queries are the held-out identities' occluded images
where the dataset records them (the synthetic benchmark's masks.npz), so that the split asks
what the test split asks (occluded query, mostly holistic gallery); without such a record,
one image per identity and camera. Every other held-out image is gallery. Held-out ids keep
their training label + 1 as pid (pid 0 is a distractor label in the Market-1501 layout).
"""

from __future__ import annotations

from typing import AbstractSet, Optional

import numpy as np

from ogfr_jax.data import records


def held_out_labels(train: records.Split, num_ids: int) -> np.ndarray:
  """The training labels held out: `num_ids` of them, evenly spaced over the sorted labels."""
  labels = np.unique(train.pids)
  if not 0 < num_ids < labels.size:
    raise ValueError(f'config.dataset.val_ids={num_ids}: must be between 1 and '
                     f'{labels.size - 1} (the training split has {labels.size} identities)')
  picks = np.floor((np.arange(num_ids) + 0.5) * labels.size / num_ids).astype(np.int64)
  return labels[picks]


def carve(data: records.DatasetSplits, num_ids: int,
          occluded: Optional[AbstractSet[str]] = None
          ) -> tuple[records.DatasetSplits, records.DatasetSplits]:
  """(training splits without the held-out identities, validation splits of them).

  `occluded`: file names (basenames) of the training images that carry a real occluder; the
  held-out ones become the queries. None: one query per held-out identity and camera.
  """
  train = data.train
  held = np.isin(train.pids, held_out_labels(train, num_ids))
  keep = np.flatnonzero(~held)
  new_pids, _ = records.relabel(train.pids[keep])
  rest = records.Split(tuple(train.paths[i] for i in keep), new_pids, train.camids[keep])

  query_rows, gallery_rows = [], []
  seen: set[tuple[int, int]] = set()
  for i in np.flatnonzero(held):
    name = train.paths[i].replace('\\', '/').rsplit('/', 1)[-1]
    key = (int(train.pids[i]), int(train.camids[i]))
    if occluded is not None:
      is_query = name in occluded
    else:
      is_query = key not in seen
      seen.add(key)
    (query_rows if is_query else gallery_rows).append(i)
  if not query_rows:
    raise ValueError(f'config.dataset.val_ids={num_ids}: the held-out identities have no '
                     'occluded image to query with; hold out more identities')

  def subset(rows):
    rows = np.asarray(rows, np.int64)
    return records.Split(tuple(train.paths[i] for i in rows), train.pids[rows] + 1,
                         train.camids[rows])

  training = records.DatasetSplits(data.name, data.root, rest, data.query, data.gallery,
                                   data.ignored)
  val = records.DatasetSplits(f'{data.name}-val', data.root, rest, subset(query_rows),
                              subset(gallery_rows))
  return training, val
