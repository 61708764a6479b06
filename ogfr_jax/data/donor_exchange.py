"""Donor pixels of the 'person' and 'crop' occluders, pasted on the devices or on the host.

A donor occluder is a box of another row of the same global batch. Each process builds only
its own rows of that batch, so under `config.input.donor_exchange='host'` a process whose
row takes a donor from another process's rows decodes and augments that donor again (same
generators, same pixels); at one or a few rows per host that is most of its decoding.

Under 'device' (the default) the host draws everything about the occluder exactly as before
(`occlusion.draw_occlusion`: the same random numbers in the same order) but leaves the donor's
box unpainted and sends where it goes instead, as three more batch keys:

  row        int32 [b]     the global pipeline row of each row (process p: p * b + i)
  donor_row  int32 [b]     global pipeline row of the donor, -1 when no donor box is pasted
  donor_box  int32 [b, 6]  (y, x, h, w, sy, sx): occluded[y:y+h, x:x+w] =
                           image[donor_row][sy:sy+h, sx:sx+w]; zeros when donor_row is -1

and the jitted train step fills the boxes from the global `image` array before normalising
(`fill_donors`; XLA moves the donor rows between devices). `row` makes this independent of how
the global array orders the processes' rows (a TPU torus may interleave hosts). The result
is bitwise the host's `occluded`; `paste_on_host` does the same paste in numpy for a batch
that holds every donor (one process), which is what tools that show the pixels use.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ogfr_jax.data import occlusion

MODES = ('device', 'host')
KEYS = ('row', 'donor_row', 'donor_box')
BOX_FIELDS = 6  # y, x, h, w, sy, sx


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f'config.input.donor_exchange={mode!r}: must be one of {list(MODES)}')
  return mode


def on_device(config) -> bool:
  """Whether train batches of `config` leave the donor boxes to the devices (and so carry
  KEYS): 'device' mode and some donor type can be synthesised."""
  if check_mode(str(config.input.donor_exchange)) != 'device':
    return False
  c = config.occlusion
  if not c.enabled or float(c.prob) <= 0:
    return False
  return any(p in occlusion.DONOR_TYPES and p not in tuple(c.holdout) for p in c.patterns)


def no_donors(rows: np.ndarray) -> dict[str, np.ndarray]:
  """The donor keys of rows that take no donor pixels (`rows`: their global rows)."""
  n = len(rows)
  return {'row': np.asarray(rows, np.int32), 'donor_row': np.full(n, -1, np.int32),
          'donor_box': np.zeros((n, BOX_FIELDS), np.int32)}


def paste_on_host(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """`batch['occluded']` with its donor boxes filled in, in numpy.

  The batch must hold every donor row: a whole global batch (one process), or rows gathered
  from all processes. Raises naming the missing row otherwise.
  """
  occluded = np.array(batch['occluded'], copy=True)
  position = {int(r): i for i, r in enumerate(np.asarray(batch['row']))}
  for i, (donor, box) in enumerate(zip(np.asarray(batch['donor_row']),
                                       np.asarray(batch['donor_box']))):
    if donor < 0:
      continue
    if int(donor) not in position:
      raise ValueError(f'row {int(batch["row"][i])} takes its occluder from row {int(donor)}, '
                       'which this batch does not hold: paste on the devices, or build the '
                       "batch with config.input.donor_exchange='host'")
    occluded[i] = occlusion.paste_donor(occluded[i], batch['image'][position[int(donor)]],
                                        occlusion.DonorBox(*(int(v) for v in box)))
  return occluded


def paste_on_device(occluded: jax.Array, image: jax.Array, row: jax.Array,
                    donor_row: jax.Array, donor_box: jax.Array) -> jax.Array:
  """`occluded` [n, H, W, C] with each row's donor box filled from `image` (jnp, jittable).

  All arrays hold the same n rows (a global batch, in any row order; `row` names each one).
  Box pixels lie inside the image, so clipping the source indices changes only pixels that
  the select then drops.
  """
  n, H, W = image.shape[:3]
  # position[r] = where global pipeline row r sits in these arrays.
  position = jnp.argsort(row)
  donors = jnp.take(image, position[jnp.maximum(donor_row, 0)], axis=0)
  y, x, h, w, sy, sx = (donor_box[:, k] for k in range(BOX_FIELDS))

  def shifted(donor, y, x, sy, sx):
    rows = jnp.clip(jnp.arange(H) - y + sy, 0, H - 1)
    cols = jnp.clip(jnp.arange(W) - x + sx, 0, W - 1)
    return jnp.take(jnp.take(donor, rows, axis=0), cols, axis=1)

  source = jax.vmap(shifted)(donors, y, x, sy, sx)
  u = jnp.arange(H)[None, :, None]
  v = jnp.arange(W)[None, None, :]
  e = lambda a: a[:, None, None]
  inside = ((e(donor_row) >= 0) & (u >= e(y)) & (u < e(y + h)) & (v >= e(x))
            & (v < e(x + w)))
  return jnp.where(inside[..., None], source, occluded)


def fill_donors(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The batch with `occluded` complete and the donor keys gone; as given without them."""
  if 'donor_row' not in batch:
    return dict(batch)
  rest = {k: v for k, v in batch.items() if k not in KEYS}
  rest['occluded'] = paste_on_device(batch['occluded'], batch['image'], batch['row'],
                                     batch['donor_row'], batch['donor_box'])
  return rest
