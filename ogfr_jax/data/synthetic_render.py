"""Drawing of one synthetic image: identities, cameras, poses, the person, occluders and
contamination, in numpy.

Every shape is a mask computed from coordinate grids, so one image costs a few dozen array
operations. `render` draws one image from its own random stream; data/synthetic_plan.py says
which images a dataset holds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ogfr_jax.data.synthetic_config import (BACKGROUND_STYLES, CLOTHING_PATTERNS,
                                            CONTAMINATION_TYPES, OCCLUDER_TYPES)

_OCCLUDED_AREA = (0.2, 0.5)  # target fraction of the image an occluder covers
# Target fraction of the image a 'pedestrian' contamination shows (what the border and the
# target leave of it).
_PEDESTRIAN_AREA = (0.15, 0.35)
_MAX_HIDDEN = 0.7  # most of the person's pixels an occluder may hide

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
