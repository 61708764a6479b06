"""The plan of a synthetic dataset (which image goes where, drawn with what) and its
rendering without files."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from ogfr_jax.data.synthetic_config import (IDENTITY_CONTAMINATION, query_occluder_types,
                                            resolve_config, seen_occluder_types)
from ogfr_jax.data.synthetic_render import (Identity, Rendered, _grid, _noise_bank,
                                            camera_backdrop, draw_camera, draw_identity, render)

_SPLIT_CODES = {'train': 1, 'query': 2, 'gallery': 3}



@dataclasses.dataclass(frozen=True)
class Item:
  """One planned image: where it goes and what is drawn into it."""
  split: str
  index: int  # within the split (distractors continue the gallery numbering)
  pid: int  # 0 = distractor
  cam: int  # 0-based
  occluder: str | None
  clutter: str | None  # the contamination kind (CONTAMINATION_TYPES), None for none
  # Person id whose clothes the contamination wears (IDENTITY_CONTAMINATION kinds; another
  # identity of the same split group); 0: none, or a person outside the dataset.
  source: int = 0

  @property
  def name(self) -> str:
    return f'{self.pid:04d}_c{self.cam + 1}s1_{self.index + 1:06d}_01.jpg'


def plan(cfg: Any) -> list[Item]:
  """Which image goes where: split, identity, camera, occluder and contamination of every
  file.

  The draws of each concern come from their own stream ([seed, 300] ids, cameras, query and
  gallery occluders, training contamination; 301 training occluders; 302 gallery
  contamination; 303 the identities contamination wears), so that a fraction set to 0 leaves
  everything else as it was: e.g. contaminated_gallery_fraction=0 gives the same dataset with
  a clean gallery.
  """
  p = resolve_config(cfg)
  rng = np.random.default_rng([p['seed'], 300])
  n_cam = p['num_cameras']
  per_id = p['images_per_id']
  train_pids = np.arange(1, p['num_train_ids'] + 1)
  test_pids = np.arange(p['num_train_ids'] + 1, p['num_train_ids'] + p['num_test_ids'] + 1)
  kinds = tuple(p['contamination_types'])
  query_types, seen_types = query_occluder_types(p), seen_occluder_types(p)

  def cams_for(n_images: int, cams: np.ndarray) -> np.ndarray:
    return rng.permutation(cams[np.arange(n_images) % len(cams)])

  train = []
  for pid in train_pids:
    cams = rng.choice(n_cam, int(rng.integers(2, n_cam + 1)), replace=False)
    train += [(int(pid), int(c)) for c in cams_for(per_id, cams)]
  query, gallery = [], []
  n_q = max(1, per_id // 4)
  for pid in test_pids:
    cams = rng.choice(n_cam, int(rng.integers(2, n_cam + 1)), replace=False)
    query += [(int(pid), int(cams[0]))] * n_q  # one query camera, never in the gallery
    gallery += [(int(pid), int(c)) for c in cams_for(per_id - n_q, cams[1:])]
  n_distractors = int(round(p['distractor_fraction'] * len(gallery)))
  gallery += [(0, int(c)) for c in rng.integers(0, n_cam, n_distractors)]

  def chosen(n: int, fraction: float, pool: int | None = None) -> np.ndarray:
    pool = n if pool is None else pool
    flags = np.zeros(n, bool)
    flags[rng.permutation(pool)[:int(round(fraction * pool))]] = True
    return flags

  source_rng = np.random.default_rng([p['seed'], 303])

  def source(kind: str | None, pid: int, pids: np.ndarray) -> int:
    """Another identity of the same group for the kinds that wear one (0: none left)."""
    if kind not in IDENTITY_CONTAMINATION:
      return 0
    others = pids[pids != pid]
    return int(others[source_rng.integers(len(others))]) if others.size else 0

  items = []
  clut = chosen(len(train), p['clutter_fraction'])
  # Training occluders draw from their own stream, so that the rest of the plan (and every
  # image) is the same whatever occluded_train_fraction is.
  train_rng = np.random.default_rng([p['seed'], 301])
  train_occ = np.zeros(len(train), bool)
  train_occ[train_rng.permutation(len(train))[:int(round(p['occluded_train_fraction']
                                                          * len(train)))]] = True
  for i, (pid, cam) in enumerate(train):
    kind = kinds[rng.integers(len(kinds))] if clut[i] else None
    occluder = (seen_types[train_rng.integers(len(seen_types))] if train_occ[i] else None)
    items.append(Item('train', i, pid, cam, occluder, kind, source(kind, pid, train_pids)))
  occ = chosen(len(query), p['occluded_query_fraction'])
  for i, (pid, cam) in enumerate(query):
    kind = query_types[rng.integers(len(query_types))] if occ[i] else None
    items.append(Item('query', i, pid, cam, kind, None))
  n_gid = len(gallery) - n_distractors
  occ = chosen(len(gallery), p['occluded_gallery_fraction'], pool=n_gid)
  gallery_occluders = [seen_types[rng.integers(len(seen_types))] if occ[i] else None
                       for i in range(len(gallery))]
  # Contamination of the holistic gallery images (distractors included), its own stream.
  gallery_rng = np.random.default_rng([p['seed'], 302])
  holistic = np.flatnonzero(~occ)
  contaminated = np.zeros(len(gallery), bool)
  picked = gallery_rng.permutation(holistic.size)[
      :int(round(p['contaminated_gallery_fraction'] * holistic.size))]
  contaminated[holistic[picked]] = True
  for i, (pid, cam) in enumerate(gallery):
    kind = kinds[gallery_rng.integers(len(kinds))] if contaminated[i] else None
    items.append(Item('gallery', i, pid, cam, gallery_occluders[i], kind,
                      source(kind, pid, test_pids)))
  return items


def _identity_for(seed: int, item: Item) -> Identity:
  if item.pid > 0:
    return draw_identity(np.random.default_rng([seed, 100, item.pid]))
  # Distractors are people outside the dataset ids: their own stream per image.
  return draw_identity(np.random.default_rng([seed, 101, item.index]))


def _contaminant_for(seed: int, item: Item, identities: dict[int, Identity]) -> Identity | None:
  """The identity whose clothes the item's contamination wears, if its kind wears one."""
  if item.clutter not in IDENTITY_CONTAMINATION:
    return None
  if item.source > 0:
    if item.source not in identities:
      identities[item.source] = draw_identity(np.random.default_rng([seed, 100, item.source]))
    return identities[item.source]
  # No other identity in the group: a person outside the dataset.
  return draw_identity(np.random.default_rng([seed, 102, _SPLIT_CODES[item.split], item.index]))


def iter_images(cfg: Any, items: Sequence[Item] | None = None
                ) -> Iterator[tuple[Item, Rendered]]:
  """Yields (item, rendering) for items (default: the whole plan), writing no files.

  An item renders the same whatever else is rendered with it, so callers may pass a subset of
  plan(cfg) or variants of its items (e.g. without the occluder).
  """
  p = resolve_config(cfg)
  seed = p['seed']
  cams = [draw_camera(np.random.default_rng([seed, 200, c]), c) for c in range(p['num_cameras'])]
  grid = _grid(p['height'], p['width'])
  backdrops = [camera_backdrop(c, p['height'], p['width']) for c in cams]
  noise_bank = _noise_bank(seed, 8 * p['height'] * p['width'] * 3)
  identities: dict[int, Identity] = {}
  for item in plan(p) if items is None else items:
    if item.pid > 0 and item.pid not in identities:
      identities[item.pid] = _identity_for(seed, item)
    ident = identities[item.pid] if item.pid > 0 else _identity_for(seed, item)
    rng = np.random.default_rng([seed, _SPLIT_CODES[item.split], item.index])
    yield item, render(rng, ident, cams[item.cam], grid, backdrops[item.cam], item.occluder,
                       item.clutter, noise_bank, _contaminant_for(seed, item, identities))

