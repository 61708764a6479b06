"""The synthetic benchmark's parameters: names, defaults, validation and the dataset key.

What `synthetic.*` config fields mean and which values are allowed; `config_hash` keys the
cached dataset folders (data/synthetic_cache.py) together with `GENERATOR_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import ml_collections
import numpy as np

# Bump when the drawing changes so that cached folders of older versions are not reused.
# Version 3: contamination in the gallery too, the identity-wearing kinds 'pedestrian' and
# 'clothing', held-out query occluder types; clutter.npz gains `splits` and `sources`. The
# readers still read version 2 folders; `ensure` refuses them for a version 3 config.
GENERATOR_VERSION = '3'

OCCLUDER_TYPES = ('vehicle', 'pole', 'pedestrian', 'foliage', 'board')
CLOTHING_PATTERNS = ('plain', 'hstripes', 'vstripes', 'checks', 'logo')
CLUTTER_TYPES = ('noise', 'shapes', 'text')  # identity-free digital clutter (version 2's kinds)
CONTAMINATION_TYPES = ('pedestrian', 'clothing') + CLUTTER_TYPES
# Contamination kinds drawn in another identity's clothing.
IDENTITY_CONTAMINATION = ('pedestrian', 'clothing')
BACKGROUND_STYLES = ('gradient', 'floor', 'texture')
SPLIT_DIRS = {'train': 'bounding_box_train', 'query': 'query', 'gallery': 'bounding_box_test'}

_REQUIRED_FIELDS = ('seed', 'num_train_ids', 'num_test_ids', 'images_per_id', 'num_cameras',
                    'height', 'width', 'clutter_fraction', 'occluded_query_fraction')
# Fields a config may leave out; the values here are what the generator then uses.
OPTIONAL_FIELDS = {
    'occluded_gallery_fraction': 0.1,  # Occluded-Duke's gallery holds some occluded images too
    # Occluded-Duke's training set is about 14% occluded. 0 keeps the training split holistic.
    'occluded_train_fraction': 0.0,
    'distractor_fraction': 0.1,  # pid-0 gallery images, as a fraction of test-id gallery images
    # Holistic gallery images (distractors included) that get planted contamination.
    'contaminated_gallery_fraction': 0.5,
    # What contamination is planted (train and gallery alike): names from CONTAMINATION_TYPES.
    'contamination_types': ('pedestrian', 'clothing'),
    # Occluder types only queries see (queries use only these; training never does). Empty:
    # every type everywhere.
    'holdout_occluders': (),
}
# Name-list fields and the names each may hold (stored as lists in the canonical order).
_NAME_FIELDS = {'contamination_types': CONTAMINATION_TYPES, 'holdout_occluders': OCCLUDER_TYPES}


def resolve_config(cfg: Any) -> dict[str, Any]:
  """Returns the generator's parameters as a plain dict with every optional field filled in.

  Accepts the `config.synthetic` ConfigDict or any mapping with the same keys. The resolved
  dict is what the cache key hashes, so leaving an optional field out and writing its default
  give the same dataset folder.
  """
  if hasattr(cfg, 'to_dict'):
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise TypeError(f'synthetic config must be a mapping or ConfigDict, got {type(cfg).__name__}')
  missing = [k for k in _REQUIRED_FIELDS if k not in cfg]
  if missing:
    raise ValueError(f'synthetic config lacks field(s) {missing}')
  unknown = sorted(set(cfg) - set(_REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
  if unknown:
    raise ValueError(f'unknown synthetic config field(s) {unknown}; known: '
                     f'{sorted(_REQUIRED_FIELDS + tuple(OPTIONAL_FIELDS))}')
  out: dict[str, Any] = {}
  for key in _REQUIRED_FIELDS + tuple(OPTIONAL_FIELDS):
    value = cfg.get(key, OPTIONAL_FIELDS.get(key))
    if key in _NAME_FIELDS:
      out[key] = _names(key, value)
    elif key.endswith('fraction'):
      if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f'synthetic.{key} must be a number in [0, 1], got {value!r}')
      if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f'synthetic.{key} must lie in [0, 1], got {value}')
      out[key] = float(value)
    else:
      if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or (
          int(value) != value):
        raise ValueError(f'synthetic.{key} must be an integer, got {value!r}')
      out[key] = int(value)
  limits = {
      'seed': (0, None, ''),
      'num_train_ids': (1, None, ''),
      'num_test_ids': (1, None, ''),
      'images_per_id': (2, None, ': a test identity needs a query and a gallery image'),
      'num_cameras': (2, 9, ': queries and gallery need different cameras, and Market-1501 '
                            'names hold one camera digit'),
      'height': (32, 4096, ''),
      'width': (16, 4096, ''),
  }
  for key, (lo, hi, why) in limits.items():
    if out[key] < lo or (hi is not None and out[key] > hi):
      bound = f'[{lo}, {hi}]' if hi is not None else f'>= {lo}'
      raise ValueError(f'synthetic.{key} must be {bound}, got {out[key]}{why}')
  if out['num_train_ids'] + out['num_test_ids'] > 9999:
    raise ValueError('synthetic.num_train_ids + synthetic.num_test_ids must be at most 9999 '
                     '(four-digit Market-1501 person ids)')
  if not out['contamination_types'] and (out['clutter_fraction'] > 0
                                         or out['contaminated_gallery_fraction'] > 0):
    raise ValueError('synthetic.contamination_types is empty but synthetic.clutter_fraction / '
                     'synthetic.contaminated_gallery_fraction plant contamination; name at '
                     f'least one of {CONTAMINATION_TYPES} or set both fractions to 0')
  if len(out['holdout_occluders']) == len(OCCLUDER_TYPES) and (
      out['occluded_train_fraction'] > 0 or out['occluded_gallery_fraction'] > 0):
    raise ValueError('synthetic.holdout_occluders holds out every occluder type, so none is '
                     'left for the occluded training and gallery images '
                     '(synthetic.occluded_train_fraction, synthetic.occluded_gallery_fraction)')
  return out


def _names(key: str, value: Any) -> list[str]:
  """A name-list field: a sequence (or comma-separated string) of known names, returned in the
  canonical order so that equal sets give equal datasets (and hashes)."""
  known = _NAME_FIELDS[key]
  if isinstance(value, str):
    value = [v.strip() for v in value.split(',') if v.strip()]
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise ValueError(f'synthetic.{key} must be a sequence of names from {known}, got {value!r}')
  unknown = [v for v in value if v not in known]
  if unknown:
    raise ValueError(f'synthetic.{key}: unknown name(s) {unknown}; known: {known}')
  if len(set(value)) != len(value):
    raise ValueError(f'synthetic.{key} lists a name twice: {list(value)}')
  return [k for k in known if k in value]


def query_occluder_types(p: Mapping[str, Any]) -> tuple[str, ...]:
  """Occluder types of the queries: the held-out ones if any, else all."""
  return tuple(p['holdout_occluders']) or OCCLUDER_TYPES


def seen_occluder_types(p: Mapping[str, Any]) -> tuple[str, ...]:
  """Occluder types of occluded training and gallery images (and so of the occluder bank)."""
  return tuple(k for k in OCCLUDER_TYPES if k not in p['holdout_occluders'])


def config_hash(cfg: Any) -> str:
  """Key of a dataset: the resolved config and the generator version."""
  blob = json.dumps({'version': GENERATOR_VERSION, 'config': resolve_config(cfg)},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]



def add_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the `synthetic` section (the generator's fields and their defaults) to a config,
  unless it has one: only configs on the embedded benchmark carry it. Returns `c`."""
  if 'synthetic' in c:
    return c
  s = ml_collections.ConfigDict()
  s.seed = 0
  s.num_train_ids = 64
  s.num_test_ids = 48
  s.images_per_id = 12  # per identity, spread over cameras
  s.num_cameras = 4
  s.height = 128
  s.width = 64
  s.clutter_fraction = 0.5  # holistic train images that get planted clutter
  s.occluded_query_fraction = 1.0
  s.occluded_gallery_fraction = 0.1  # as in Occluded-Duke, a few occluded gallery images
  s.occluded_train_fraction = 0.0  # Occluded-Duke: ~14% of training images occluded
  s.distractor_fraction = 0.1  # pid-0 gallery images, relative to test-id gallery images
  # Holistic gallery images (distractors included) that get planted, identity-free
  # contamination (generator v3), so that purification has something to remove at test time.
  s.contaminated_gallery_fraction = 0.5
  # What is planted in train and gallery images: 'pedestrian' (a non-target pedestrian beside
  # the target, cut by the border), 'clothing' (another identity's clothing texture), and the
  # v2 kinds 'noise', 'shapes', 'text' (data/synthetic.py, CONTAMINATION_TYPES).
  s.contamination_types = ('pedestrian', 'clothing')
  # Held-out occlusion protocol: query occluder types never seen in training (neither in the
  # occluded training images nor in the occluder bank). Empty: every type everywhere.
  s.holdout_occluders = ()
  with c.unlocked():
    c.synthetic = s
  return c


def section(config: Any) -> ml_collections.ConfigDict:
  """config.synthetic, or the defaults for a config without that section."""
  if 'synthetic' in config:
    return config.synthetic
  return add_config(ml_collections.ConfigDict()).synthetic
