"""The embedded occluded person re-identification benchmark, drawn procedurally.

No real dataset can be fetched where this project runs, yet the default job must train and be
scored on something with the structure of Occluded-Duke: identities seen by several cameras,
occluded queries against a mostly holistic gallery, and distractors. This module draws such a
benchmark in numpy (every shape is a mask computed from coordinate grids, so one image costs a
few dozen array operations) and writes it in the Market-1501 layout, so the ordinary reader
loads it:

  <root>/bounding_box_train/  query/  bounding_box_test/   PPPP_cCsS_FFFFFF_NN.jpg
  <root>/masks.npz     occluder masks and types of every occluded query / gallery / train image
  <root>/clutter.npz   masks of the contamination planted in holistic train and gallery images
  <root>/meta.json     generator version, resolved config, type names, per-split counts
  <root>/occluders/    the occluders of the occluded training images, cut out as RGBA PNGs,
                       and index.json with each one's type and box in its source image: the
                       occluder bank that occlusion synthesis (type 'bank') pastes from, as
                       methods on real data crop occluders from the training set by hand

Both npz files hold parallel arrays: `names` (file names), `splits`, `types`, `masks`
([N, H, ceil(W/8)] uint8, bit-packed along the width: np.unpackbits(masks, axis=-1,
count=width)), and `height`, `width`; masks.npz adds `placements`, clutter.npz adds `sources`
(the person id whose clothing the contamination wears, 0 for identity-free kinds).
`load_side_info` unpacks them per file. Version 2 folders (train-only clutter.npz without
`splits` and `sources`) read the same way.

Contamination (`CONTAMINATION_TYPES`, chosen by `synthetic.contamination_types`) is what a
purification module should find: pixels that do not belong to the image's identity but look
like a person. 'pedestrian' is a partially visible non-target pedestrian walking alongside,
cut by the image border and behind the target (as FED models non-target pedestrians), drawn
by the person renderer in another identity's clothing (another train identity in training
images, another test identity in the gallery); 'clothing' is a patch of another identity's
shirt and trousers; 'noise', 'shapes' and 'text' are identity-free digital clutter (version
2's only kinds). It is planted in `clutter_fraction` of the training images and in
`contaminated_gallery_fraction` of the holistic gallery images; the target person is never
hidden by the 'pedestrian' kind, the others may lie over it.

What makes it a re-identification problem rather than a colour lookup:
- identities share a small clothing palette and differ by pattern (stripes, checks, a logo),
  sleeves, shorts, hair, accessories and body shape, with per-identity and per-image colour
  jitter;
- each camera has its own light (gain and colour cast), person scale and foot line, background
  style and sensor noise, and images vary in pose (stride, lean, mirror facing);
- queries are occluded by one of `OCCLUDER_TYPES` covering roughly 20-50% of the image, and of
  each test identity the query camera never holds a gallery image of it;
- `holdout_occluders` lists occluder types seen only by queries: queries are then occluded by
  those types alone, and occluded training and gallery images (hence the occluder bank) by
  the others (the held-out occlusion-type protocol, configs/synthetic_holdout.py).

Everything is a pure function of the config: every image draws from its own random stream keyed
by (seed, split, index), so the output is byte-identical for one seed whatever the order of work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

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
_OCCLUDED_AREA = (0.2, 0.5)  # target fraction of the image an occluder covers
# Target fraction of the image a 'pedestrian' contamination shows (what the border and the
# target leave of it).
_PEDESTRIAN_AREA = (0.15, 0.35)
_MAX_HIDDEN = 0.7  # most of the person's pixels an occluder may hide
_SPLIT_CODES = {'train': 1, 'query': 2, 'gallery': 3}
_JPEG_QUALITY = 95

# Shared palettes: several identities wear the same base colour, so colour is not an identity key.
_SHIRT = np.array([[.75, .13, .12], [.16, .30, .74], [.90, .90, .87], [.10, .10, .11],
                   [.50, .50, .50], [.20, .52, .25], [.90, .78, .20], [.55, .30, .60]], np.float32)
_TROUSERS = np.array([[.10, .10, .11], [.20, .30, .50], [.45, .45, .46], [.70, .62, .45],
                      [.40, .27, .17], [.84, .84, .80]], np.float32)
_SHOES = np.array([[.07, .07, .07], [.92, .92, .92], [.42, .26, .14], [.50, .50, .52]], np.float32)
_SKIN = np.array([[.96, .80, .69], [.87, .67, .52], [.68, .49, .36], [.45, .31, .22]], np.float32)
_HAIR = np.array([[.08, .07, .06], [.30, .19, .11], [.80, .68, .40], [.62, .62, .62],
                  [.55, .25, .12]], np.float32)
_CAR = np.array([[.80, .10, .10], [.85, .85, .85], [.10, .10, .12], [.15, .25, .60],
                 [.60, .62, .65], [.85, .70, .15]], np.float32)


# --------------------------------------------------------------------------------------------
# Config


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


# --------------------------------------------------------------------------------------------
# Random draws of identities and cameras


@dataclasses.dataclass(frozen=True)
class Identity:
  """Appearance of one person, in body-height units (head top at v=0, soles at v=1)."""
  shirt: np.ndarray
  shirt2: np.ndarray  # second colour of the pattern
  pattern: str
  period: float  # stripe / check period
  long_sleeves: bool
  trousers: np.ndarray
  shorts: bool
  shoes: np.ndarray
  skin: np.ndarray
  hair: np.ndarray
  long_hair: bool
  hat: np.ndarray | None
  bag: np.ndarray | None
  bag_side: int
  height: float  # relative to the camera's nominal person height
  shoulder: float  # half width at the shoulders
  waist: float  # half width at the waist
  head: float  # head radius
  legs: float  # leg length


def _pick(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> np.ndarray:
  base = palette[rng.integers(len(palette))]
  return np.clip(base + rng.uniform(-jitter, jitter, 3), 0, 1).astype(np.float32)


def draw_identity(rng: np.random.Generator) -> Identity:
  """One random person; identities of the dataset and extra people (occluders) both use it."""
  shirt_i = rng.integers(len(_SHIRT))
  shirt = np.clip(_SHIRT[shirt_i] + rng.uniform(-.06, .06, 3), 0, 1).astype(np.float32)
  other = (shirt_i + rng.integers(1, len(_SHIRT))) % len(_SHIRT)
  shirt2 = np.clip(_SHIRT[other] + rng.uniform(-.06, .06, 3), 0, 1).astype(np.float32)
  return Identity(
      shirt=shirt, shirt2=shirt2,
      pattern=CLOTHING_PATTERNS[rng.choice(len(CLOTHING_PATTERNS),
                                           p=[.3, .175, .175, .175, .175])],
      period=float(rng.uniform(.035, .07)),
      long_sleeves=bool(rng.random() < .5),
      trousers=_pick(rng, _TROUSERS, .05), shorts=bool(rng.random() < .25),
      shoes=_pick(rng, _SHOES, .04), skin=_pick(rng, _SKIN, .03), hair=_pick(rng, _HAIR, .04),
      long_hair=bool(rng.random() < .3),
      hat=_pick(rng, _SHIRT, .08) if rng.random() < .2 else None,
      bag=_pick(rng, _SHIRT, .08) * .8 if rng.random() < .3 else None,
      bag_side=int(rng.choice([-1, 1])),
      height=float(rng.uniform(.88, 1.04)), shoulder=float(rng.uniform(.1, .14)),
      waist=float(rng.uniform(.08, .12)), head=float(rng.uniform(.055, .072)),
      legs=float(rng.uniform(.44, .52)))


@dataclasses.dataclass(frozen=True)
class Camera:
  gain: float
  cast: np.ndarray  # per-channel multiplier
  scale: float  # person height / image height
  foot: float  # foot line / image height
  style: str
  colours: np.ndarray  # [3, 3] background colours
  noise: float  # sensor noise sigma (0-1 scale)
  light_side: float  # -1..1: side the light comes from, and how strongly
  facing_right: float  # probability that people face right in this view
  blur: bool  # a soft, low-resolution camera
  seed: int


def draw_camera(rng: np.random.Generator, index: int) -> Camera:
  cast = rng.uniform(.85, 1.15, 3)
  return Camera(
      gain=float(rng.uniform(.7, 1.2)), cast=(cast / cast.mean()).astype(np.float32),
      scale=float(rng.uniform(.74, .92)), foot=float(rng.uniform(.92, .99)),
      style=BACKGROUND_STYLES[index % len(BACKGROUND_STYLES)],
      colours=np.clip(rng.uniform(.25, .8, (3, 1)) + rng.uniform(-.12, .12, (3, 3)), 0,
                      1).astype(np.float32),
      noise=float(rng.uniform(.01, .05)), light_side=float(rng.uniform(-1, 1)),
      facing_right=float(rng.uniform(.2, .8)), blur=bool(rng.random() < .35),
      seed=int(rng.integers(2**31)))


# --------------------------------------------------------------------------------------------
# Drawing primitives (boolean masks over coordinate grids)


def _ellipse(u, v, cu, cv, ru, rv):
  return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _capsule(u, v, p0, p1, r):
  """Thick segment: points within r of the segment p0-p1."""
  du, dv = float(p1[0] - p0[0]), float(p1[1] - p0[1])
  a = u - float(p0[0])
  b = v - float(p0[1])
  t = a * (du / (du * du + dv * dv + 1e-12)) + b * (dv / (du * du + dv * dv + 1e-12))
  np.minimum(np.maximum(t, 0, out=t), 1, out=t)
  a -= t * du
  b -= t * dv
  return a * a + b * b <= r * r


def _box(u, v, u0, u1, v0, v1):
  return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells_h: int, cells_w: int,
                  channels: int = 1) -> np.ndarray:
  """Value noise in [0, 1]: a random lattice, bilinearly interpolated to h x w."""
  grid = rng.random((cells_h + 1, cells_w + 1, channels)).astype(np.float32)
  y = np.linspace(0, cells_h, h, dtype=np.float32)
  x = np.linspace(0, cells_w, w, dtype=np.float32)
  y0 = np.minimum(y.astype(int), cells_h - 1)
  x0 = np.minimum(x.astype(int), cells_w - 1)
  fy = (y - y0)[:, None, None]
  fx = (x - x0)[None, :, None]
  g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
  g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
  top = g00 * (1 - fx) + g01 * fx
  bottom = g10 * (1 - fx) + g11 * fx
  return top * (1 - fy) + bottom * fy


@dataclasses.dataclass(frozen=True)
class _Grid:
  yy: np.ndarray  # [H, W] pixel centre rows
  xx: np.ndarray

  @property
  def shape(self) -> tuple[int, int]:
    return self.yy.shape


def _grid(h: int, w: int) -> _Grid:
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float32) + .5, np.arange(w, dtype=np.float32) + .5,
                       indexing='ij')
  return _Grid(yy, xx)


# --------------------------------------------------------------------------------------------
# People


@dataclasses.dataclass(frozen=True)
class Pose:
  top: float  # pixel row of the head top
  size: float  # body height in pixels
  cx: float  # pixel column of the body axis
  facing: int  # +1 / -1 (mirror)
  stride: float  # leg swing angle, radians
  lean: float  # shear of the body towards +u, per body height
  light: float = 1.0  # -1..1: side of the image the light comes from, and how strongly


def draw_pose(rng: np.random.Generator, ident: Identity, cam: Camera, h: int, w: int) -> Pose:
  size = h * cam.scale * ident.height * float(rng.uniform(.95, 1.05))
  foot = h * (cam.foot + float(rng.normal(0, .012)))
  return Pose(top=foot - size, size=size, cx=w / 2 + float(rng.normal(0, .04 * w)),
              facing=1 if rng.random() < cam.facing_right else -1,
              stride=float(rng.uniform(-.32, .32)), lean=float(rng.normal(0, .03)),
              light=cam.light_side)


# Part labels of the person label map; index 0 means "not the person".
_PARTS = ('none', 'hair', 'skin', 'trousers', 'shoes', 'shirt', 'shirt2', 'hat', 'bag')
_P = {name: i for i, name in enumerate(_PARTS)}


def _part_colours(ident: Identity) -> np.ndarray:
  cols = np.zeros((len(_PARTS), 3), np.float32)
  for name in ('hair', 'skin', 'trousers', 'shoes', 'shirt', 'shirt2', 'hat', 'bag'):
    value = getattr(ident, name)
    if value is not None:
      cols[_P[name]] = value
  return cols


def draw_person(canvas: np.ndarray, grid: _Grid, ident: Identity, pose: Pose,
                colour_jitter: np.ndarray | None = None) -> np.ndarray:
  """Paints one person onto canvas [H, W, 3] in place; returns the silhouette mask.

  Shapes fill a small integer label map over the person's bounding box in drawing order
  (later shapes cover earlier ones); colours are looked up once at the end, which is far cheaper
  than painting RGB for every shape.
  """
  h, w = grid.shape
  sil = np.zeros((h, w), bool)
  r0 = max(0, int(np.floor(pose.top - .06 * pose.size)))
  r1 = min(h, int(np.ceil(pose.top + 1.06 * pose.size)) + 1)
  half = (.42 + abs(pose.lean)) * pose.size
  c0 = max(0, int(np.floor(pose.cx - half)))
  c1 = min(w, int(np.ceil(pose.cx + half)) + 1)
  if r0 >= r1 or c0 >= c1:
    return sil
  v = (grid.yy[r0:r1, c0:c1] - pose.top) / pose.size
  u = (grid.xx[r0:r1, c0:c1] - pose.cx) / pose.size * pose.facing
  u = u - pose.lean * (1.0 - v)  # lean pivots on the feet
  lab = np.zeros(v.shape, np.uint8)
  rows = v.shape[0]

  def put(label: int, shape, v_lo: float, v_hi: float, *args) -> None:
    """Labels where shape(u, v, *args) holds, testing only rows with v in [v_lo, v_hi]."""
    a = max(0, int(np.floor(pose.top + v_lo * pose.size - r0 - 1)))
    b = min(rows, int(np.ceil(pose.top + v_hi * pose.size - r0 + 1)))
    if a < b:
      lab[a:b][shape(u[a:b], v[a:b], *args)] = label

  def capsule(label: int, p0, p1, r: float) -> None:
    put(label, _capsule, min(p0[1], p1[1]) - r, max(p0[1], p1[1]) + r, p0, p1, r)

  hd, sh, wa = ident.head, ident.shoulder, ident.waist
  neck_v = 2 * hd + .01
  waist_v = 1.0 - ident.legs
  shoe_h = .03

  if ident.long_hair:  # behind the torso
    put(_P['hair'], _box, hd, neck_v + .09, -hd * .95, hd * .95, hd, neck_v + .09)

  # Legs: thigh and shin capsules; shorts show skin below the knee.
  hip_u = wa * .5
  leg_len = 1.0 - waist_v - shoe_h
  leg_r = wa * .42
  for side, ang in ((-1, pose.stride), (1, -pose.stride)):
    hip = (side * hip_u, waist_v)
    foot = (hip[0] + leg_len * np.sin(ang), waist_v + leg_len * np.cos(ang))
    knee = ((hip[0] + foot[0]) / 2, (hip[1] + foot[1]) / 2)
    capsule(_P['skin' if ident.shorts else 'trousers'], knee, foot, leg_r * .85)
    capsule(_P['trousers'], hip, knee, leg_r)
    put(_P['shoes'], _ellipse, foot[1] - shoe_h, foot[1] + 2 * shoe_h, foot[0] + .02,
        foot[1] + shoe_h * .3, .045, shoe_h)

  # Torso: a trapezoid from the shoulders to the hips, with rounded shoulders.
  def torso(u, v):
    t = np.clip((v - neck_v) / (waist_v + .04 - neck_v), 0, 1)
    m = (v >= neck_v) & (v <= waist_v + .04) & (np.abs(u) <= sh + (wa - sh) * t)
    return m & ~((v < neck_v + .04) & (np.abs(u) > sh - .03) &
                 ~_ellipse(u, v, np.sign(u) * (sh - .03), neck_v + .04, .03, .04))

  put(_P['shirt'], torso, neck_v, waist_v + .04)
  if ident.pattern != 'plain':
    put(_P['shirt2'], lambda u, v: torso(u, v) & _shirt_pattern(ident, u, v, neck_v), neck_v,
        waist_v + .04)

  # Arms swing against the legs; sleeves end at the elbow or at the wrist.
  arm_len = .36
  arm_r = sh * .2
  for side, ang in ((-1, -.6 * pose.stride), (1, .6 * pose.stride)):
    out = side * .09
    s0 = (side * (sh - arm_r * .8), neck_v + .03)
    hand = (s0[0] + arm_len * np.sin(ang + out), s0[1] + arm_len * np.cos(ang + out))
    elbow = ((s0[0] + hand[0]) / 2, (s0[1] + hand[1]) / 2)
    capsule(_P['shirt' if ident.long_sleeves else 'skin'], elbow, hand, arm_r * .85)
    put(_P['skin'], _ellipse, hand[1] - arm_r * 2, hand[1] + arm_r * 2, hand[0], hand[1] + .01,
        arm_r * 1.1, arm_r * 1.3)
    capsule(_P['shirt'], s0, elbow, arm_r)

  if ident.bag is not None:
    b = ident.bag_side
    capsule(_P['bag'], (-b * sh * .6, neck_v + .01), (b * (sh + .03), waist_v - .08), .008)
    put(_P['bag'], _box, waist_v - .09, waist_v + .06, min(b * (sh - .01), b * (sh + .08)),
        max(b * (sh - .01), b * (sh + .08)), waist_v - .09, waist_v + .06)

  put(_P['skin'], _box, hd * 1.6, neck_v + .01, -hd * .45, hd * .45, hd * 1.6, neck_v + .01)
  put(_P['skin'], _ellipse, 0, 2 * hd, 0, hd, hd * .85, hd)  # head
  put(_P['hair'], lambda u, v: _ellipse(u, v, 0, hd, hd * .85, hd) & (
      (v < hd * .75) | ((np.abs(u) > hd * .62) & (v < hd * 1.5))), 0, hd * 1.5)
  if ident.hat is not None:
    put(_P['hat'], lambda u, v: (_ellipse(u, v, 0, hd * .55, hd * .95, hd * .7) & (v < hd * .7))
        | _box(u, v, -hd * .8, hd * 1.5, hd * .55, hd * .75), -hd * .2, hd * .8)

  cols = _part_colours(ident)
  if colour_jitter is not None:
    cols = np.clip(cols + colour_jitter, 0, 1)
  mask = lab > 0
  # Side light: one side of the body is darker, which gives volume.
  shade = 1.0 + .2 * pose.light * np.clip(u[mask] * pose.facing / (sh + .02), -1, 1)
  crop = canvas[r0:r1, c0:c1]
  crop[mask] = cols[lab[mask]] * shade[:, None]
  sil[r0:r1, c0:c1] = mask
  return sil


def _shirt_pattern(ident: Identity, u, v, top: float):
  """Where the shirt shows its second colour (in body units, so it moves with the pose)."""
  p = ident.period
  if ident.pattern == 'hstripes':
    return ((v - top) / p) % 1.0 < .45
  if ident.pattern == 'vstripes':
    return (u / p + .25) % 1.0 < .45
  if ident.pattern == 'checks':
    return (((v - top) / p) % 1.0 < .5) ^ ((u / p) % 1.0 < .5)
  if ident.pattern == 'logo':  # an off-centre patch: a mirrored view moves it to the other side
    return _box(u, v, .005, .065, top + .05, top + .11)
  return np.zeros(u.shape, bool)


# --------------------------------------------------------------------------------------------
# Scenes


def camera_backdrop(cam: Camera, h: int, w: int) -> np.ndarray:
  """The camera's static scene [h, 2w, 3]; each image sees a w-wide window of it."""
  crng = np.random.default_rng(cam.seed)
  grid = _grid(h, 2 * w)
  c = cam.colours
  y = grid.yy / h
  x = grid.xx / w
  if cam.style == 'gradient':
    t = (y + .2 * np.sin(np.pi * x + crng.uniform(0, 6)))[..., None]
    bg = c[0] * (1 - t) + c[1] * t
  elif cam.style == 'floor':
    horizon = float(crng.uniform(.5, .68))
    wall = c[0] * (.9 + .1 * np.cos(3 * np.pi * x + crng.uniform(0, 6)))[..., None]
    floor = c[1] * (.75 + .25 * ((y - horizon) / (1 - horizon)))[..., None]
    # Floor tiles: lines that converge on a vanishing point above the image.
    tile = np.abs(((x - 1) / np.maximum(y - horizon + .3, .05) * 3) % 1.0 - .5)
    floor = np.where((tile < .06)[..., None], floor * .7, floor)
    bg = np.where((y < horizon)[..., None], wall, floor)
    bg = np.where((np.abs(y - horizon) < .012)[..., None], c[2], bg)
  else:  # texture: a brick wall with low-frequency stains
    bh = h / float(crng.integers(8, 14))
    bw = w / float(crng.integers(2, 4))
    row = np.floor(grid.yy / bh)
    off = (row % 2) * bw / 2
    mortar = ((grid.yy % bh) < 1.2) | (((grid.xx + off) % bw) < 1.2)
    bg = np.where(mortar[..., None], c[2] * .6 + .3, c[0])
    bg = bg * (.8 + .4 * _smooth_noise(crng, h, 2 * w, 3, 4))
  return bg.astype(np.float32)


def _background(rng: np.random.Generator, backdrop: np.ndarray, w: int) -> np.ndarray:
  """A window of the camera's scene under this moment's light patches."""
  h = backdrop.shape[0]
  x0 = int(rng.integers(0, backdrop.shape[1] - w + 1))
  return backdrop[:, x0:x0 + w] * (.85 + .3 * _smooth_noise(rng, h, w, 2, 2))


def _occluder(rng: np.random.Generator, kind: str, grid: _Grid, pose: Pose, cam: Camera,
              target: float) -> tuple[np.ndarray, np.ndarray, str]:
  """Returns (mask, colour field [H, W, 3], placement) of an occluder covering ~target."""
  h, w = grid.shape
  yy, xx = grid.yy, grid.xx
  if kind == 'vehicle':
    x0 = float(rng.uniform(-.5, .15)) * w
    x1 = x0 + float(rng.uniform(1.0, 1.6)) * w
    visible = min(x1, w) - max(x0, 0.0)
    body_h = min(target * w / visible, .7) * h
    r = body_h * .22
    top = h - body_h
    body = _box(xx, yy, x0, x1, top, h - r * .6)
    wheels = (_ellipse(xx, yy, x0 + .25 * (x1 - x0), h - r * .9, r, r) |
              _ellipse(xx, yy, x1 - .22 * (x1 - x0), h - r * .9, r, r))
    colour = _pick(rng, _CAR, .05)
    field = np.broadcast_to(colour, (h, w, 3)).copy()
    glass = _box(xx, yy, x0 + .06 * (x1 - x0), x1 - .06 * (x1 - x0), top + .08 * body_h,
                 top + .38 * body_h) & (((xx - x0) % (.35 * (x1 - x0))) > 2)
    field[glass] = (.2, .26, .32)
    field[_box(xx, yy, x0, x1, top + .6 * body_h, top + .63 * body_h)] *= .6
    field[wheels] = (.05, .05, .05)
    hubs = (_ellipse(xx, yy, x0 + .25 * (x1 - x0), h - r * .9, r * .4, r * .4) |
            _ellipse(xx, yy, x1 - .22 * (x1 - x0), h - r * .9, r * .4, r * .4))
    field[hubs] = (.6, .6, .6)
    return body | wheels, field, 'bottom'
  if kind == 'pole':
    pw = min(target, .3) * w
    cx = pose.cx + float(rng.choice([-1, 1]) * rng.uniform(.05, .3)) * w
    mask = np.abs(xx - cx) <= pw / 2
    shade = np.cos(np.clip((xx - cx) / (pw / 2 + 1e-6), -1, 1) * np.pi / 2) * .5 + .5
    colour = _pick(rng, np.array([[.55, .55, .57], [.8, .7, .2], [.3, .3, .32], [.7, .4, .2]],
                                 np.float32), .05)
    field = colour * shade[..., None]
    stripes = ((yy / (h * .08)) % 1.0 < .5) if rng.random() < .3 else None
    if stripes is not None:  # a hazard-striped post
      field = np.where(stripes[..., None], field * .3, field)
    placement = 'center' if abs(cx - pose.cx) < .12 * w else ('left' if cx < pose.cx else 'right')
    return mask, field, placement
  if kind == 'pedestrian':
    other = draw_identity(rng)
    side = float(rng.choice([-1, 1]))
    size = pose.size * float(rng.uniform(1.0, 1.25))
    foot = h * float(rng.uniform(1.0, 1.12))
    opose = Pose(top=foot - size, size=size,
                 cx=pose.cx + side * w * float(rng.uniform(.18, .45)),
                 facing=int(rng.choice([-1, 1])), stride=float(rng.uniform(-.3, .3)),
                 lean=float(rng.normal(0, .03)), light=pose.light)
    field = np.zeros((h, w, 3), np.float32)
    mask = draw_person(field, grid, other, opose)
    return mask, field, 'left' if side < 0 else 'right'
  if kind == 'foliage':
    placement = str(rng.choice(['bottom', 'left', 'right']))
    if placement == 'bottom':
      cy = h * (1.02 - target * .9)
      centres = [(cy + rng.uniform(-.05, .12) * h, rng.uniform(-.1, 1.1) * w) for _ in range(9)]
    else:
      cx = w * (target * .95 if placement == 'left' else 1 - target * .95)
      centres = [(rng.uniform(.1, 1.05) * h, cx + rng.uniform(-.1, .1) * w) for _ in range(9)]
    rad = .22 * w + target * .3 * w
    field_v = np.zeros((h, w), np.float32)
    for cy_, cx_ in centres:
      field_v = np.maximum(field_v, 1 - ((yy - cy_) ** 2 + (xx - cx_) ** 2) / rad ** 2)
    if placement == 'bottom':
      field_v = np.maximum(field_v, (yy > cy + .1 * h).astype(np.float32))
    elif placement == 'left':
      field_v = np.maximum(field_v, (xx < cx - .12 * w).astype(np.float32))
    else:
      field_v = np.maximum(field_v, (xx > cx + .12 * w).astype(np.float32))
    leaves = _smooth_noise(rng, h, w, max(2, h // 6), max(2, w // 6))[..., 0]
    mask = field_v + .45 * (leaves - .5) > .25
    green = np.array([[.18, .42, .14], [.12, .3, .1], [.35, .45, .12], [.45, .35, .1]],
                     np.float32)
    base = _pick(rng, green, .04)
    field = base * (.55 + .9 * leaves)[..., None]
    return mask, field, placement
  if kind == 'board':
    bw = float(rng.uniform(.65, 1.1)) * w
    bh = min(target * h * w / bw, .55 * h)
    cy = float(rng.uniform(.12, .5)) * h + bh / 2 * .3
    cx = pose.cx + float(rng.uniform(-.25, .25)) * w
    board = _box(xx, yy, cx - bw / 2, cx + bw / 2, cy - bh / 2, cy + bh / 2)
    post = _box(xx, yy, cx - .035 * w, cx + .035 * w, cy, h)
    frame_c = _pick(rng, np.array([[.2, .2, .2], [.6, .6, .6], [.1, .2, .5]], np.float32), .05)
    face_c = _pick(rng, np.array([[.9, .9, .85], [.15, .45, .2], [.15, .3, .7], [.85, .75, .2]],
                                 np.float32), .05)
    field = np.broadcast_to(frame_c, (h, w, 3)).copy()
    face = _box(xx, yy, cx - bw / 2 + 2, cx + bw / 2 - 2, cy - bh / 2 + 2, cy + bh / 2 - 2)
    field[face] = face_c
    lines = face & ((yy - cy + bh / 2) % max(bh / 5, 3) < max(bh / 14, 1.2))
    lines &= ((xx * .7 + np.floor((yy - cy) / max(bh / 5, 3)) * 13) % 9 > 2)
    field[lines] = 1 - face_c
    return board | post, field, 'top' if cy - bh / 2 < .25 * h else 'middle'
  raise ValueError(f'unknown occluder type {kind!r}; known: {OCCLUDER_TYPES}')


def _clutter(rng: np.random.Generator, kind: str, grid: _Grid, person: np.ndarray,
             other: Identity | None = None, cam: Camera | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Digital contamination (mask, colour field) over part of the person or the background:
  identity-free clutter, or ('clothing') a patch of `other`'s clothes as `cam` sees them."""
  h, w = grid.shape
  yy, xx = grid.yy, grid.xx
  area = float(rng.uniform(.04, .12)) * h * w
  if kind == 'clothing':  # a garment is larger than a sticker
    area *= 1.6
  aspect = float(rng.uniform(.5, 2.0))
  ch = min(np.sqrt(area * aspect), .6 * h)
  cw = min(area / ch, .9 * w)
  if rng.random() < .6 and person.any():  # over the person
    ys, xs = np.nonzero(person)
    k = rng.integers(len(ys))
    cy, cx = ys[k] + .5, xs[k] + .5
  else:
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
  y0, x0 = cy - ch / 2, cx - cw / 2
  region = _box(xx, yy, x0, x0 + cw, y0, y0 + ch)
  if kind == 'noise':
    cells = rng.random((h // 2 + 1, w // 2 + 1, 3)).astype(np.float32)
    field = cells.repeat(2, 0).repeat(2, 1)[:h, :w]
    return region, field
  if kind == 'shapes':
    mask = np.zeros((h, w), bool)
    field = np.zeros((h, w, 3), np.float32)
    for _ in range(int(rng.integers(2, 5))):
      sy, sx = rng.uniform(y0, y0 + ch), rng.uniform(x0, x0 + cw)
      ry, rx = rng.uniform(.2, .5) * ch, rng.uniform(.2, .5) * cw
      if rng.random() < .5:
        m = _ellipse(xx, yy, sx, sy, rx, ry)
      else:  # a triangle
        m = (yy <= sy + ry) & (np.abs(xx - sx) <= (yy - sy + ry) / (2 * ry + 1e-6) * rx)
        m &= yy >= sy - ry
      field[m] = rng.random(3)
      mask |= m
    return mask, field
  if kind == 'clothing':  # a garment: shirt (with its pattern) above, trousers below
    if other is None:
      raise ValueError("the 'clothing' contamination needs the identity whose clothes it shows")
    scale = ch / .6  # pixels per body unit: the patch spans 0.6 body heights
    u = (xx - x0 - cw / 2) / scale
    v = (yy - y0) / scale
    field = np.broadcast_to(other.shirt, (h, w, 3)).copy()
    if other.pattern != 'plain':
      field[_shirt_pattern(other, u, v, 0.0)] = other.shirt2
    field[v > .34] = other.trousers
    # Rounded shoulders: the garment's top corners are cut.
    corner = (v < .06) & (np.abs(u) > cw / scale / 2 - .05)
    if cam is not None:
      field = field * (cam.gain * cam.cast)
    return region & ~corner, field
  if kind == 'text':
    plate = rng.uniform(.75, 1.0, 3).astype(np.float32)
    ink = rng.uniform(0, .3, 3).astype(np.float32)
    field = np.broadcast_to(plate, (h, w, 3)).copy()
    pitch = max(ch / float(rng.integers(2, 6)), 4.0)
    row = np.floor((yy - y0) / pitch)
    in_line = ((yy - y0) % pitch) > pitch * .45
    word = ((xx - x0 + row * 7.3) % (float(rng.uniform(5, 11)))) > 1.5
    field[region & in_line & word] = ink
    return region, field
  raise ValueError(f'unknown contamination type {kind!r}; known: {CONTAMINATION_TYPES}')


def _side_pedestrian(rng: np.random.Generator, other: Identity, grid: _Grid, pose: Pose,
                     person: np.ndarray) -> tuple[Pose, np.ndarray]:
  """A non-target pedestrian beside the target, cut by the image border: (its pose, the mask
  of what stays visible behind the target). Poses are redrawn until the visible part covers
  the target range of `_PEDESTRIAN_AREA`, else the closest is kept."""
  h, w = grid.shape
  lo, hi = _PEDESTRIAN_AREA
  target = float(rng.uniform(lo, hi))
  scratch = np.zeros((h, w, 3), np.float32)
  best, best_miss = None, np.inf
  side = float(rng.choice([-1, 1]))
  for attempt in range(8):
    if attempt == 4:
      side = -side  # the other border, in case the target stands close to this one
    size = pose.size * float(rng.uniform(.92, 1.08))
    foot = pose.top + pose.size + float(rng.normal(0, .015)) * h
    opose = Pose(top=foot - size, size=size,
                 cx=pose.cx + side * w * float(rng.uniform(.35, .65)),
                 facing=int(rng.choice([-1, 1])), stride=float(rng.uniform(-.3, .3)),
                 lean=float(rng.normal(0, .03)), light=pose.light)
    visible = draw_person(scratch, grid, other, opose) & ~person
    miss = abs(visible.mean() - target)
    if miss < best_miss:
      best, best_miss = (opose, visible), miss
    if lo <= visible.mean() <= hi and miss < .04:
      break
  return best


def _noise_bank(seed: int, size: int) -> np.ndarray:
  """Standard normal values that images take windows of: drawing fresh noise per image costs
  more than drawing the rest of the image."""
  return np.random.default_rng([seed, 400]).standard_normal(size, dtype=np.float32)


def _soften(img: np.ndarray) -> np.ndarray:
  """A soft, low-resolution camera: 2x2 blocks averaged and spread back."""
  h, w = img.shape[:2]
  hh, ww = h - h % 2, w - w % 2
  out = img.copy()
  small = img[:hh, :ww].reshape(hh // 2, 2, ww // 2, 2, 3).mean((1, 3))
  out[:hh, :ww] = small.repeat(2, 0).repeat(2, 1)
  return out


def _light(img: np.ndarray, cam: Camera, rng: np.random.Generator,
           noise_bank: np.ndarray | None = None) -> np.ndarray:
  img = img * (cam.gain * float(rng.uniform(.9, 1.1))) * cam.cast
  if noise_bank is None or noise_bank.size < 2 * img.size:
    noise = rng.standard_normal(img.shape, dtype=np.float32)
  else:
    start = int(rng.integers(0, noise_bank.size - img.size + 1))
    noise = noise_bank[start:start + img.size].reshape(img.shape)
  return img + cam.noise * noise


@dataclasses.dataclass
class Rendered:
  image: np.ndarray  # uint8 [H, W, 3]
  person_mask: np.ndarray | None = None  # the identity's silhouette (before occluders)
  occluder: str | None = None
  placement: str | None = None
  occluder_mask: np.ndarray | None = None
  clutter: str | None = None
  clutter_mask: np.ndarray | None = None


def render(rng: np.random.Generator, ident: Identity, cam: Camera, grid: _Grid,
           backdrop: np.ndarray, occluder: str | None = None, clutter: str | None = None,
           noise_bank: np.ndarray | None = None, other: Identity | None = None) -> Rendered:
  """One image: background, a side pedestrian (contamination), the person, an optional
  occluder, camera light and noise, digital contamination.

  clutter names the contamination kind (CONTAMINATION_TYPES); `other` is the identity whose
  clothes the 'pedestrian' and 'clothing' kinds wear. backdrop is camera_backdrop(cam, H, W),
  passed in so that it is drawn once per camera; noise_bank (optional) holds sensor noise to
  take windows of.
  """
  h, w = grid.shape
  # Occluder and contamination draw from their own streams, so that an image with and
  # without them is the same everywhere outside their masks.
  occ_rng, clutter_rng = rng.spawn(2)
  canvas = _background(rng, backdrop, w)
  pose = draw_pose(rng, ident, cam, h, w)
  jitter = rng.uniform(-.03, .03, 3).astype(np.float32)
  scene = canvas.copy() if clutter == 'pedestrian' else None
  person = draw_person(canvas, grid, ident, pose, jitter)
  contam = None
  if scene is not None:  # behind the target: draw it into the bare scene, then the target
    if other is None:
      raise ValueError("the 'pedestrian' contamination needs the identity it shows")
    opose, contam = _side_pedestrian(clutter_rng, other, grid, pose, person)
    draw_person(scene, grid, other, opose,
                clutter_rng.uniform(-.03, .03, 3).astype(np.float32))
    draw_person(scene, grid, ident, pose, jitter)
  if cam.blur:
    canvas = _soften(canvas)
    scene = None if scene is None else _soften(scene)
  if scene is not None:
    np.copyto(canvas, scene, where=contam[..., None])
  out = Rendered(image=np.empty(0, np.uint8), person_mask=person)
  if occluder is not None:
    lo, hi = _OCCLUDED_AREA
    body = max(int(person.sum()), 1)
    best, best_miss = None, np.inf
    for _ in range(16):  # shapes are random: keep the first that covers the target range and
      target = float(occ_rng.uniform(lo, hi))  # leaves enough of the person to recognise,
      drawn = _occluder(occ_rng, occluder, grid, pose, cam, target)  # else the closest
      area = drawn[0].mean()
      miss = (max(0.0, lo - .05 - area, area - hi - .05) +
              max(0.0, np.count_nonzero(drawn[0] & person) / body - _MAX_HIDDEN))
      if miss < best_miss:
        best, best_miss = drawn, miss
      if miss == 0:
        break
    mask, field, placement = best
    field = field.astype(np.float32)
    np.copyto(canvas, _soften(field) if cam.blur else field, where=mask[..., None])
    out.occluder, out.placement, out.occluder_mask = occluder, placement, mask
    if contam is not None:
      contam = contam & ~mask
  img = _light(canvas, cam, rng, noise_bank)
  if clutter is not None and contam is None:  # digital contamination sits on top
    contam, field = _clutter(clutter_rng, clutter, grid, person, other, cam)
    np.copyto(img, field.astype(np.float32), where=contam[..., None])
  if clutter is not None:
    out.clutter, out.clutter_mask = clutter, contam
  out.image = (np.clip(img, 0, 1) * 255 + .5).astype(np.uint8)
  return out


# --------------------------------------------------------------------------------------------
# Dataset plan and writer


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


def _stack_packed(packed: Sequence[np.ndarray], h: int, w: int) -> np.ndarray:
  """[N, H, ceil(W/8)] uint8: masks bit-packed along the width (np.unpackbits(..., count=W))."""
  if not packed:
    return np.zeros((0, h, (w + 7) // 8), np.uint8)
  return np.stack(packed)


@dataclasses.dataclass(frozen=True)
class _Written:
  """What the writer keeps of one image after saving it."""
  item: Item
  occluder: str | None
  placement: str | None
  occluder_bits: np.ndarray | None  # packed along the width
  clutter: str | None
  clutter_bits: np.ndarray | None
  cutout_box: tuple[int, int, int, int] | None = None  # (y0, x0, y1, x1) of a bank cut-out


OCCLUDER_BANK_DIR = 'occluders'


def _save_cutout(image: np.ndarray, mask: np.ndarray, path: str
                 ) -> tuple[int, int, int, int] | None:
  """Writes the masked pixels of image, cropped to the mask's box, as an RGBA PNG."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if not rows.size:
    return None
  y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
  alpha = (mask[y0:y1, x0:x1] > 0).astype(np.uint8) * 255
  Image.fromarray(np.dstack([image[y0:y1, x0:x1], alpha]), 'RGBA').save(path)
  return y0, x0, y1, x1


def _write_items(p: dict[str, Any], root: str, items: Sequence[Item]) -> list[_Written]:
  out = []
  for item, r in iter_images(p, items):
    Image.fromarray(r.image).save(os.path.join(root, SPLIT_DIRS[item.split], item.name),
                                  quality=_JPEG_QUALITY)
    box = None
    if item.split == 'train' and r.occluder_mask is not None:
      visible = r.occluder_mask if r.clutter_mask is None else (r.occluder_mask
                                                               & ~r.clutter_mask.astype(bool))
      box = _save_cutout(r.image, visible, os.path.join(
          root, OCCLUDER_BANK_DIR, os.path.splitext(item.name)[0] + '.png'))
    out.append(_Written(
        item, r.occluder, r.placement,
        None if r.occluder_mask is None else np.packbits(r.occluder_mask, axis=-1),
        r.clutter, None if r.clutter_mask is None else np.packbits(r.clutter_mask, axis=-1),
        box))
  return out


def _default_workers(num_images: int) -> int:
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cpus = os.cpu_count() or 1
  # Starting a worker costs about a second, so small sets are drawn in this process.
  return max(1, min(cpus, 8, num_images // 2000))


def generate(root: str, cfg: Any, workers: int | None = None) -> str:
  """Writes the benchmark into root (absent or empty) and returns root.

  workers > 1 draws chunks of images in that many processes (default: one per 2000 images, at
  most 8 and at most the CPUs available); the output does not depend on it. meta.json is
  written last, so a folder with meta.json is a finished dataset.
  """
  p = resolve_config(cfg)
  if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
    raise FileExistsError(f'synthetic dataset target {root!r} exists and is not an empty folder')
  for d in list(SPLIT_DIRS.values()) + [OCCLUDER_BANK_DIR]:
    os.makedirs(os.path.join(root, d), exist_ok=True)
  items = plan(p)
  workers = _default_workers(len(items)) if workers is None else int(workers)
  if workers > 1:
    # Spawned, not forked: the caller may hold JAX or grain threads that a fork would break.
    import concurrent.futures  # noqa: PLC0415
    import multiprocessing  # noqa: PLC0415
    chunk = -(-len(items) // (4 * workers))
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn')) as pool:
      written = [w for part in pool.map(_write_items, [p] * len(chunks), [root] * len(chunks),
                                        chunks) for w in part]
  else:
    written = _write_items(p, root, items)

  h, w = p['height'], p['width']
  occ = {'names': [], 'splits': [], 'types': [], 'placements': [], 'masks': []}
  clut = {'names': [], 'splits': [], 'types': [], 'sources': [], 'masks': []}
  # 'clutter' and 'contaminated' count the same images (the first is version 2's name).
  counts = {s: {'images': 0, 'ids': set(), 'cameras': set(), 'occluded': 0, 'clutter': 0,
                'contaminated': 0, 'distractors': 0} for s in SPLIT_DIRS}
  for r in written:
    item = r.item
    c = counts[item.split]
    c['images'] += 1
    c['cameras'].add(item.cam)
    if item.pid > 0:
      c['ids'].add(item.pid)
    else:
      c['distractors'] += 1
    if r.occluder is not None:
      c['occluded'] += 1
      occ['names'].append(item.name)
      occ['splits'].append(item.split)
      occ['types'].append(r.occluder)
      occ['placements'].append(r.placement)
      occ['masks'].append(r.occluder_bits)
    if r.clutter is not None:
      c['clutter'] += 1
      c['contaminated'] += 1
      clut['names'].append(item.name)
      clut['splits'].append(item.split)
      clut['types'].append(r.clutter)
      clut['sources'].append(item.source)
      clut['masks'].append(r.clutter_bits)
  bank = {os.path.splitext(r.item.name)[0] + '.png': {
      'type': r.occluder, 'box': [round(v, 4) for v in (r.cutout_box[0] / h, r.cutout_box[1] / w,
                                                       r.cutout_box[2] / h, r.cutout_box[3] / w)]}
          for r in written if r.cutout_box is not None}
  with open(os.path.join(root, OCCLUDER_BANK_DIR, 'index.json'), 'w') as f:
    json.dump(bank, f, indent=0, sort_keys=True)
  np.savez_compressed(os.path.join(root, 'masks.npz'), names=np.array(occ['names'], str),
                      splits=np.array(occ['splits'], str), types=np.array(occ['types'], str),
                      placements=np.array(occ['placements'], str),
                      masks=_stack_packed(occ['masks'], h, w), height=h, width=w)
  np.savez_compressed(os.path.join(root, 'clutter.npz'), names=np.array(clut['names'], str),
                      splits=np.array(clut['splits'], str), types=np.array(clut['types'], str),
                      sources=np.array(clut['sources'], np.int32),
                      masks=_stack_packed(clut['masks'], h, w), height=h, width=w)
  meta = {
      'generator_version': GENERATOR_VERSION,
      'config_hash': config_hash(p),
      'config': p,
      'occluder_types': list(OCCLUDER_TYPES),
      'clothing_patterns': list(CLOTHING_PATTERNS),
      'clutter_types': list(CLUTTER_TYPES),
      'contamination_types': list(CONTAMINATION_TYPES),
      'background_styles': list(BACKGROUND_STYLES),
      'split_dirs': SPLIT_DIRS,
      'counts': {s: {k: (len(v) if isinstance(v, set) else v) for k, v in c.items()}
                 for s, c in counts.items()},
  }
  tmp = os.path.join(root, 'meta.json.part')
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, os.path.join(root, 'meta.json'))
  return root


# --------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> str:
  base = os.environ.get('OGFR_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                          'ogfr_jax')
  return os.path.join(base, 'synthetic')


def _regenerate_hint(folder: str) -> str:
  return (f'to regenerate it, delete {folder}, or point config.dataset.root at another folder '
          "(or leave it '' for the default cache, $OGFR_JAX_CACHE or "
          '~/.cache/ogfr_jax/synthetic), where the dataset is generated on first use')


def _read_meta(folder: str) -> dict | None:
  """meta.json of a finished dataset folder, or None where folder holds none."""
  meta_path = os.path.join(folder, 'meta.json')
  if not os.path.isfile(meta_path):
    return None
  with open(meta_path) as f:
    return json.load(f)


def check_version(folder: str, meta: Mapping[str, Any]) -> None:
  """Raises when the dataset in folder was drawn by another generator version: its images,
  side files and protocol differ from what this code's configs describe."""
  version = str(meta.get('generator_version'))
  if version != GENERATOR_VERSION:
    raise RuntimeError(
        f'{folder} holds a synthetic dataset of generator version {version}, but this code '
        f'draws version {GENERATOR_VERSION} (configs of one version do not describe the '
        f'other\'s images, contamination or side files); {_regenerate_hint(folder)}')


def _is_complete(folder: str, key: str) -> bool:
  meta = _read_meta(folder)
  if meta is None:
    return False
  check_version(folder, meta)
  if meta.get('config_hash') != key:
    raise RuntimeError(f'{folder} holds a synthetic dataset of another config '
                       f'({meta.get("config_hash")} != {key}); delete the folder')
  return True


@contextlib.contextmanager
def _file_lock(path: str):
  """Exclusive lock so that processes on one host generate once; a no-op where unsupported.

  Correctness does not depend on it (the final rename decides); it only saves duplicate work.
  """
  try:
    import fcntl  # noqa: PLC0415 (POSIX only)
  except ImportError:
    yield
    return
  with open(path, 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:  # e.g. a network file system without locks
      yield
      return
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _remove_dead_temps(cache_dir: str, name: str) -> None:
  """Deletes temp folders of killed generations started on this host (their pid is gone)."""
  host = socket.gethostname()
  prefix = f'.{name}.tmp.'
  for entry in os.listdir(cache_dir):
    if not entry.startswith(prefix):
      continue
    parts = entry[len(prefix):].split('.')
    if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
      continue
    try:
      os.kill(int(parts[1]), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(cache_dir, entry), ignore_errors=True)
    except OSError:
      pass  # alive but not ours


def ensure(cfg: Any, cache_dir: str | None = None) -> str:
  """Returns the folder of the dataset for cfg under cache_dir, generating it if missing.

  The folder name holds a hash of the resolved config and the generator version. Generation
  goes to a temporary sibling folder that is renamed into place when complete, so a killed run
  never leaves a folder that looks finished, and concurrent callers (several processes of one
  job) are safe: whoever loses the rename race uses the winner's folder.

  cache_dir may also be a dataset folder itself (config.dataset.root pointing at a generated
  dataset): it is used when it holds this config's dataset of this generator version, and
  refused, naming the version or the config and how to regenerate, otherwise.
  """
  key = config_hash(cfg)
  cache_dir = cache_dir or default_cache_dir()
  own = _read_meta(cache_dir) if os.path.isdir(cache_dir) else None
  if own is not None:
    check_version(cache_dir, own)
    if own.get('config_hash') != key:
      raise RuntimeError(f'{cache_dir} holds a synthetic dataset of another config '
                         f'({own.get("config_hash")} != {key}: see its meta.json); '
                         f'{_regenerate_hint(cache_dir)}')
    return cache_dir
  name = f'synthetic-v{GENERATOR_VERSION}-{key}'
  target = os.path.join(cache_dir, name)
  if _is_complete(target, key):
    return target
  os.makedirs(cache_dir, exist_ok=True)
  with _file_lock(os.path.join(cache_dir, f'.{name}.lock')):
    if _is_complete(target, key):
      return target
    _remove_dead_temps(cache_dir, name)
    tmp = tempfile.mkdtemp(prefix=f'.{name}.tmp.{socket.gethostname()}.{os.getpid()}.',
                           dir=cache_dir)
    try:
      generate(tmp, cfg)
      try:
        os.rename(tmp, target)
      except OSError:
        if not _is_complete(target, key):
          raise RuntimeError(f'cannot move the generated dataset into {target}: the folder '
                             'exists but is not a finished dataset; delete it') from None
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return target


# --------------------------------------------------------------------------------------------
# Side information and token scoring


def load_side_info(root: str, splits: Sequence[str] | None = None) -> dict[str, dict]:
  """Per file name: occluder type / placement / mask and contamination ('clutter') type /
  mask / source (the person id whose clothes it wears, 0 for identity-free kinds).

  Only files with an occluder or contamination have an entry; any other image is holistic and
  clean. Masks are bool [H, W] at the stored image size. `splits` limits the result (e.g.
  ('train',)). Reads version 2 folders too (their clutter.npz: train images, no sources).
  """
  out: dict[str, dict] = {}
  empty = {'split': None, 'occluder_type': None, 'occluder_placement': None,
           'occluder_mask': None, 'clutter_type': None, 'clutter_mask': None,
           'clutter_source': None}
  for fname in ('masks.npz', 'clutter.npz'):
    path = os.path.join(root, fname)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'synthetic side file {path} is missing (not a synthetic dataset '
                              'folder, or an unfinished one)')
    with np.load(path) as z:
      w = int(z['width'])
      names = z['names']
      split_of = z['splits'] if 'splits' in z else np.full(len(names), 'train')
      keep = np.ones(len(names), bool) if splits is None else np.isin(split_of, list(splits))
      if not keep.any():
        continue
      masks = np.unpackbits(z['masks'][keep], axis=-1, count=w).astype(bool)
      types = z['types'][keep]
      placements = z['placements'][keep] if 'placements' in z else None
      sources = z['sources'][keep] if 'sources' in z else np.zeros(int(keep.sum()), np.int32)
      for j, name in enumerate(names[keep]):
        entry = out.setdefault(str(name), dict(empty))
        entry['split'] = str(split_of[keep][j])
        if fname == 'masks.npz':
          entry['occluder_type'] = str(types[j])
          entry['occluder_placement'] = str(placements[j])
          entry['occluder_mask'] = masks[j]
        else:
          entry['clutter_type'] = str(types[j])
          entry['clutter_mask'] = masks[j]
          entry['clutter_source'] = int(sources[j])
  return out


CONTAMINATION_FILE = 'clutter.npz'


@functools.lru_cache(maxsize=8)
def _contamination_index(root: str, stamp: tuple[int, int]
                         ) -> tuple[dict[tuple[str, str], int], np.ndarray, int, int] | None:
  """{(split folder, file name): row}, packed masks, height, width of root's clutter.npz.

  `stamp` (mtime, size) keys the cache, so a regenerated folder is read again."""
  del stamp
  with np.load(os.path.join(root, CONTAMINATION_FILE)) as z:
    names = z['names']
    splits = z['splits'] if 'splits' in z else np.full(len(names), 'train')  # version 2
    index = {(SPLIT_DIRS.get(str(sp), str(sp)), str(n)): j
             for j, (sp, n) in enumerate(zip(splits, names))}
    return index, np.asarray(z['masks']), int(z['height']), int(z['width'])


def _benchmark_root(folder: str) -> str | None:
  """The folder above image folder `folder` if it holds a contamination side file."""
  root = os.path.dirname(os.path.abspath(folder))
  return root if os.path.isfile(os.path.join(root, CONTAMINATION_FILE)) else None


def contamination_masks(split: Any) -> Any:
  """records.PixelMasks of the planted contamination of a split's images, read from the side
  file of the synthetic dataset folder that holds them; None where no image of the split
  lies in such a folder (a real dataset). Images without contamination have no mask."""
  from ogfr_jax.data import records  # pylint: disable=g-import-not-at-top
  paths = list(split.paths)
  if not paths:
    return None
  folders = {os.path.dirname(p) for p in paths}
  roots = {f: _benchmark_root(f) for f in folders}
  if not any(roots.values()):
    return None
  rows = np.full(len(paths), -1, np.int32)
  chunks, size, offset = [], None, 0
  for folder in sorted(f for f in folders if roots[f]):
    root = roots[folder]
    st = os.stat(os.path.join(root, CONTAMINATION_FILE))
    index, packed, h, w = _contamination_index(root, (st.st_mtime_ns, st.st_size))
    if size is not None and size != (h, w):
      raise ValueError(f'the images of one split come from synthetic folders of different '
                       f'sizes ({size} and {(h, w)})')
    size = (h, w)
    key = os.path.basename(folder)
    picked = []
    for i, p in enumerate(paths):
      if os.path.dirname(p) == folder:
        j = index.get((key, os.path.basename(p)))
        if j is not None:
          rows[i] = offset + len(picked)
          picked.append(j)
    chunks.append(packed[np.asarray(picked, np.int64)] if picked
                  else np.zeros((0, h, (w + 7) // 8), np.uint8))
    offset += len(picked)
  h, w = size
  return records.PixelMasks(rows=rows, packed=np.concatenate(chunks), height=h, width=w)


def _resize_fraction(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes [..., H, W] masks to size as covered fractions (box filter: area averages)."""
  flat = mask.reshape((-1,) + mask.shape[-2:]).astype(np.float32)
  out = np.stack([np.asarray(Image.fromarray(m, mode='F').resize((size[1], size[0]),
                                                                  Image.BOX))
                  for m in flat])
  return np.clip(out, 0, 1).reshape(mask.shape[:-2] + tuple(size))


def clutter_token_mask(mask, grid_h: int, grid_w: int, patch: int, stride: int,
                       min_cover: float = 0.5,
                       input_size: tuple[int, int] | None = None) -> np.ndarray:
  """Per-token mask under an overlapping patch grid: True where clutter covers the window.

  mask is [..., H, W] (bool or fractions) at the model input size; pass input_size=(H, W)
  to resize a mask stored at another size first. Token (i, j) sees the window
  rows [i*stride, i*stride+patch) x cols [j*stride, j*stride+patch), as an unpadded patch
  convolution does; it counts as clutter if at least min_cover of the window is clutter.
  Returns bool [..., grid_h, grid_w] (flatten row-major to match the token order).
  """
  m = np.asarray(mask)
  if m.ndim < 2:
    raise ValueError(f'mask must be [..., H, W], got shape {m.shape}')
  if not 0.0 < min_cover <= 1.0:
    raise ValueError(f'min_cover must lie in (0, 1], got {min_cover}')
  if input_size is not None and tuple(m.shape[-2:]) != tuple(input_size):
    m = _resize_fraction(m, tuple(input_size))
  h, w = m.shape[-2:]
  need_h, need_w = (grid_h - 1) * stride + patch, (grid_w - 1) * stride + patch
  if grid_h < 1 or grid_w < 1 or need_h > h or need_w > w:
    raise ValueError(f'a {grid_h}x{grid_w} grid of {patch}px patches at stride {stride} needs '
                     f'{need_h}x{need_w} pixels; mask is {h}x{w}')
  sat = np.zeros(m.shape[:-2] + (h + 1, w + 1), np.float64)
  sat[..., 1:, 1:] = m.astype(np.float64).cumsum(-2).cumsum(-1)
  y0 = np.arange(grid_h) * stride
  x0 = np.arange(grid_w) * stride
  y1, x1 = y0 + patch, x0 + patch
  total = (sat[..., y1[:, None], x1[None, :]] - sat[..., y0[:, None], x1[None, :]]
           - sat[..., y1[:, None], x0[None, :]] + sat[..., y0[:, None], x0[None, :]])
  return total / (patch * patch) >= min_cover - 1e-9
