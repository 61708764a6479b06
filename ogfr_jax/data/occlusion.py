"""Occlusion synthesis: the student's view occ(x) of the teacher's holistic view x.

occ(x) is x with one occluder pasted in, so the two views stay pixel-aligned and the occluder
mask says exactly which pixels differ in origin. Pattern ids follow `config.occlusion.patterns`
(k = 1 + index); 0 means "not occluded". Types listed in `config.occlusion.holdout` are never
synthesised, while every other type keeps its id, so a model trained with a held-out type can
still be tested against it.

Synthesis runs on uint8 images before normalisation: occluder sources (solid colours, textures,
another image's pixels) are defined in pixel space, the donor images of the `person` and `crop`
types are the other rows' augmented x in that same space, and both views then go through the
single normalisation step.

The 'bank' type pastes an occluder cut-out (an RGBA PNG whose alpha marks the occluder) from
an occluder bank folder, the way occluded-ReID methods paste real occluders cropped from the
training set. A bank's optional index.json gives each cut-out's box in its source image as
fractions [y0, x0, y1, x1]; such cut-outs go back to that place and scale (jittered), others
are scaled to the drawn area and put at the drawn placement.

Work is split into a plan (pattern id and donor row, drawn first so that a caller can fetch the
donor image), a draw of the occluder's geometry and pixels (`draw_occlusion`) and, for the
donor types, the paste of the donor's box (`paste_donor`, or its device twin in
`data/donor_exchange.py`). All draws come from one Generator in a fixed order, none of them
after the donor is needed, so the result is a pure function of the generator's seed
whichever machine holds the donor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image

PATTERN_TYPES = ('object', 'texture', 'person', 'crop', 'bank')
# Types that need nothing but the batch ('bank' needs a folder of cut-outs).
DEFAULT_PATTERNS = ('object', 'texture', 'person', 'crop')
PLACEMENTS = ('bottom', 'top', 'left', 'right', 'center')
# Types whose occluder is taken from another image of the batch with a different identity.
DONOR_TYPES = frozenset({'person', 'crop'})


def check_fields(fields: dict) -> None:
  """Every check of config.occlusion that needs no file (names, ranges, the held-out types).
  `fields`: OcclusionSpec's fields; bank_dir is not read."""
  for name in ('patterns', 'holdout', 'placements'):
    joined = [v for v in fields[name] if ',' in v]
    if joined:
      # A command-line override `--config.occlusion.patterns=a,b` arrives as the one
      # string 'a,b'.
      raise ValueError(f'config.occlusion.{name}: {joined[0]!r} is one name with a comma; '
                       f'give several as a tuple, e.g. '
                       f'--config.occlusion.{name}="{tuple(joined[0].split(","))}"')
  patterns, holdout, placements = fields['patterns'], fields['holdout'], fields['placements']
  unknown = [p for p in patterns if p not in PATTERN_TYPES]
  if unknown or not patterns:
    raise ValueError(f'config.occlusion.patterns: unknown or empty pattern types {unknown} '
                     f'in {patterns}; known types are {PATTERN_TYPES}')
  if len(set(patterns)) != len(patterns):
    raise ValueError(f'config.occlusion.patterns lists a type twice: {patterns}')
  bad = [p for p in holdout if p not in patterns]
  if bad:
    raise ValueError(f'config.occlusion.holdout names {bad}, which are not in '
                     f'config.occlusion.patterns {patterns}')
  if fields['enabled'] and fields['prob'] > 0 and set(patterns) <= set(holdout):
    raise ValueError(f'config.occlusion.holdout {holdout} holds out every type of '
                     f'config.occlusion.patterns {patterns}; nothing is left to train on')
  bad = [p for p in placements if p not in PLACEMENTS]
  if bad or not placements:
    raise ValueError(f'config.occlusion.placements: unknown or empty placements {bad} in '
                     f'{placements}; known placements are {PLACEMENTS}')
  lo, hi = fields['area']
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f'config.occlusion.area must satisfy 0 < lo <= hi <= 1, got {fields["area"]}')
  if not 0.0 <= fields['prob'] <= 1.0:
    raise ValueError(f'config.occlusion.prob must lie in [0, 1], got {fields["prob"]}')


@dataclasses.dataclass(frozen=True)
class OcclusionSpec:
  """`config.occlusion` in validated form (a small picklable value for input workers)."""
  enabled: bool = True
  prob: float = 0.75
  patterns: tuple[str, ...] = DEFAULT_PATTERNS
  holdout: tuple[str, ...] = ()
  placements: tuple[str, ...] = PLACEMENTS
  area: tuple[float, float] = (0.15, 0.5)
  bank_dir: str = ''  # folder of occluder cut-outs, for the 'bank' type

  def __post_init__(self):
    check_fields(dataclasses.asdict(self))
    if (self.enabled and 'bank' in self.patterns and 'bank' not in self.holdout
        and not self.bank_dir):
      raise ValueError("config.occlusion.patterns has 'bank' but no occluder bank folder is "
                       'known: set config.occlusion.bank_dir (or put the cut-outs in '
                       '<dataset root>/occluders)')

  @property
  def num_patterns(self) -> int:
    """Size of the pattern-embedding table minus one (ids run 0..num_patterns)."""
    return len(self.patterns)

  def pattern_id(self, name: str) -> int:
    return 1 + self.patterns.index(name)

  @property
  def train_ids(self) -> tuple[int, ...]:
    """Ids of the types synthesised in training (all but the held-out ones)."""
    return tuple(self.pattern_id(p) for p in self.patterns if p not in self.holdout)


def bank_folder(config) -> str:
  """The occluder bank of a run: config.occlusion.bank_dir, else <dataset root>/occluders
  (for the synthetic benchmark, the generated dataset's folder)."""
  explicit = str(config.occlusion.bank_dir)
  if explicit:
    return explicit
  root = str(config.dataset.root or '')
  if config.dataset.name == 'synthetic':
    from ogfr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    root = synthetic.ensure(synthetic.section(config), root or None)
  return os.path.join(root, 'occluders') if root else ''


def _fields(config) -> dict:
  c = config.occlusion
  return dict(enabled=bool(c.enabled), prob=float(c.prob),
              patterns=tuple(str(p) for p in c.patterns),
              holdout=tuple(str(p) for p in c.holdout),
              placements=tuple(str(p) for p in c.placements),
              area=tuple(float(v) for v in c.area))


def check_names(config) -> None:
  """The names and ranges of `config.occlusion`, checked without reading any file (at
  config load time, before the dataset and its occluder bank exist); raises naming the bad
  field."""
  # Not through the constructor: it also asks for the bank folder, which only the dataset
  # knows.
  check_fields(_fields(config))


def occlusion_spec(config) -> OcclusionSpec:
  """Reads `config.occlusion` into an OcclusionSpec (raises naming the bad field)."""
  fields = _fields(config)
  uses_bank = (fields['enabled'] and 'bank' in fields['patterns']
               and 'bank' not in fields['holdout'])
  spec = OcclusionSpec(**fields, bank_dir=bank_folder(config) if uses_bank else '')
  if uses_bank:
    load_bank(spec.bank_dir)  # fail now, naming the folder, rather than in an input worker
  return spec


@dataclasses.dataclass(frozen=True)
class BankItem:
  rgb: np.ndarray  # uint8 [h, w, 3]
  alpha: np.ndarray  # bool [h, w]: the occluder's pixels
  box: tuple[float, float, float, float] | None  # (y0, x0, y1, x1) in its source image
  name: str


@functools.lru_cache(maxsize=4)
def load_bank(folder: str) -> tuple[BankItem, ...]:
  """The cut-outs of an occluder bank folder (*.png with alpha, optional index.json)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'occluder bank folder {folder!r} does not exist '
                            '(config.occlusion.bank_dir)')
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith('.png'))
  if not names:
    raise ValueError(f'occluder bank folder {folder!r} holds no .png cut-outs '
                     '(config.occlusion.bank_dir)')
  index = {}
  index_path = os.path.join(folder, 'index.json')
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        index = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f'occluder bank index {index_path!r} is not valid JSON: {e}') from e
  items = []
  for name in names:
    path = os.path.join(folder, name)
    try:
      with Image.open(path) as im:
        if 'A' not in im.getbands() and 'transparency' not in im.info:
          raise ValueError(f'occluder cut-out {path!r} has no alpha channel: save occluders '
                           'as RGBA PNGs, opaque on the occluder and transparent elsewhere')
        rgba = np.asarray(im.convert('RGBA'))
    except OSError as e:
      raise ValueError(f'occluder cut-out {path!r} cannot be read: {e}') from e
    alpha = rgba[..., 3] > 127
    if not alpha.any():
      raise ValueError(f'occluder cut-out {path!r} is fully transparent')
    box = index.get(name, {}).get('box')
    if box is not None:
      if len(box) != 4 or not 0 <= box[0] < box[2] <= 1 or not 0 <= box[1] < box[3] <= 1:
        raise ValueError(f'occluder bank index {index_path!r}: box of {name!r} must be '
                         f'[y0, x0, y1, x1] fractions with y0 < y1 and x0 < x1, got {box}')
      box = tuple(float(v) for v in box)
    items.append(BankItem(np.ascontiguousarray(rgba[..., :3]), alpha, box, name))
  return tuple(items)


@dataclasses.dataclass(frozen=True)
class OcclusionPlan:
  pattern: int  # 0 = not occluded, else 1 + index into spec.patterns
  donor: int  # row of the batch whose image supplies the occluder, -1 if none


def plan_occlusion(spec: OcclusionSpec, pids: Sequence[int] | np.ndarray, row: int,
                   rng: np.random.Generator) -> OcclusionPlan:
  """Chooses the pattern for batch row `row` and, for donor types, the donor row.

  Donors are rows with a different identity, so the occluder never shows the same person.
  When the batch has none, donor types are left out of the draw for this row.
  """
  if not spec.enabled or rng.random() >= spec.prob:
    return OcclusionPlan(0, -1)
  pids = np.asarray(pids)
  donors = np.flatnonzero(pids != pids[row])
  choices = [k for k in spec.train_ids
             if donors.size or spec.patterns[k - 1] not in DONOR_TYPES]
  if not choices:
    return OcclusionPlan(0, -1)
  k = int(choices[int(rng.integers(len(choices)))])
  if spec.patterns[k - 1] in DONOR_TYPES:
    return OcclusionPlan(k, int(donors[int(rng.integers(donors.size))]))
  return OcclusionPlan(k, -1)


def _band_or_box(height: int, width: int, placement: str, frac: float,
                 rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(y, x, h, w) of a region covering about `frac` of the image at `placement`.

  Edge placements are full-width (top/bottom) or full-height (left/right) bands; 'center' is
  a box of random aspect whose centre lies in the middle half of the image.
  """
  if placement in ('bottom', 'top'):
    h = min(height, max(1, int(round(frac * height))))
    return (height - h if placement == 'bottom' else 0), 0, h, width
  if placement in ('left', 'right'):
    w = min(width, max(1, int(round(frac * width))))
    return 0, (width - w if placement == 'right' else 0), height, w
  s = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
  h = min(height, max(1, int(round(height * math.sqrt(frac) * s))))
  w = min(width, max(1, int(round(frac * height * width / h))))
  y = (height - h) / 2 + rng.uniform(-0.25, 0.25) * height
  x = (width - w) / 2 + rng.uniform(-0.25, 0.25) * width
  y = int(np.clip(round(y), 0, height - h))
  x = int(np.clip(round(x), 0, width - w))
  return y, x, h, w


def _person_box(height: int, width: int, placement: str, frac: float,
                rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(y, x, h, w) of an upright strip, as a pedestrian standing in front would cover.

  left/right/center: a full-height strip at that side or near the middle; bottom/top: a strip
  at least half the image tall standing on the bottom edge or hanging from the top.
  """
  if placement in ('left', 'right', 'center'):
    w = min(width, max(1, int(round(frac * width))))
    if placement == 'left':
      x = 0
    elif placement == 'right':
      x = width - w
    else:
      x = int(np.clip(round((width - w) / 2 + rng.uniform(-0.125, 0.125) * width), 0,
                      width - w))
    return 0, x, height, w
  h = min(height, max(1, int(round(height * rng.uniform(max(frac, 0.5), 1.0)))))
  w = min(width, max(1, int(round(frac * height * width / h))))
  x = int(rng.integers(0, width - w + 1))
  return (height - h if placement == 'bottom' else 0), x, h, w


def _ellipse_mask(h: int, w: int) -> np.ndarray:
  yy = (np.arange(h) + 0.5 - h / 2) / (h / 2)
  xx = (np.arange(w) + 0.5 - w / 2) / (w / 2)
  return (yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0


def _object(image: np.ndarray, placement: str, frac: float,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A solid shape of one random colour: a rectangle, or an ellipse of the same area."""
  H, W = image.shape[:2]
  colour = rng.integers(0, 256, size=3, dtype=np.uint8)
  want_ellipse = rng.random() < 0.5
  y, x, h, w = _band_or_box(H, W, placement, frac, rng)
  mask = np.zeros((H, W), bool)
  # An ellipse covers pi/4 of its bounding box, so the box grows to keep the area (across the
  # band for edge placements, in both directions for 'center'); when that box would not fit,
  # the shape stays a rectangle.
  grow = 4.0 / math.pi
  if placement in ('bottom', 'top'):
    eh, ew = int(round(h * grow)), w
  elif placement in ('left', 'right'):
    eh, ew = h, int(round(w * grow))
  else:
    eh, ew = int(round(h * math.sqrt(grow))), int(round(w * math.sqrt(grow)))
  if want_ellipse and eh <= H and ew <= W:
    ey = {'bottom': H - eh, 'top': 0}.get(placement, int(np.clip(y + (h - eh) // 2, 0, H - eh)))
    ex = {'right': W - ew, 'left': 0}.get(placement, int(np.clip(x + (w - ew) // 2, 0, W - ew)))
    mask[ey:ey + eh, ex:ex + ew] = _ellipse_mask(eh, ew)
  else:
    mask[y:y + h, x:x + w] = True
  out = image.copy()
  out[mask] = colour
  return out, mask


def _texture_patch(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """Procedural texture, uint8 [h, w, 3]: stripes at a random angle, or blocky colour noise."""
  if rng.random() < 0.5:
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(3.0, 12.0)
    colours = rng.integers(0, 256, size=(2, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
    return colours[(np.floor(phase).astype(np.int64) & 1)]
  cell = int(rng.integers(2, 9))
  grid = rng.integers(0, 256, size=(-(-h // cell), -(-w // cell), 3), dtype=np.uint8)
  patch = np.repeat(np.repeat(grid, cell, axis=0), cell, axis=1)[:h, :w].astype(np.int16)
  grain_noise = rng.integers(-24, 25, size=(h, w, 3), dtype=np.int16)
  return np.clip(patch + grain_noise, 0, 255).astype(np.uint8)


def _resized(array: np.ndarray, h: int, w: int) -> np.ndarray:
  if array.dtype == bool:
    im = Image.fromarray(array.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)
    return np.asarray(im) > 127
  return np.asarray(Image.fromarray(array).resize((w, h), Image.BILINEAR))


def _bank(image: np.ndarray, spec: OcclusionSpec, placement: str, frac: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Pastes a random cut-out of the bank (mirrored half the time)."""
  H, W = image.shape[:2]
  bank = load_bank(spec.bank_dir)
  item = bank[int(rng.integers(len(bank)))]
  rgb, alpha, box = item.rgb, item.alpha, item.box
  if rng.random() < 0.5:
    rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
    box = None if box is None else (box[0], 1.0 - box[3], box[2], 1.0 - box[1])
  if box is not None:
    scale = math.exp(rng.uniform(math.log(0.85), math.log(1.15)))
    h, w = (box[2] - box[0]) * H * scale, (box[3] - box[1]) * W * scale
    cy = (box[0] + box[2]) / 2 * H + rng.uniform(-0.05, 0.05) * H
    cx = (box[1] + box[3]) / 2 * W + rng.uniform(-0.1, 0.1) * W
  else:
    aspect = alpha.shape[0] / alpha.shape[1]
    h = min(float(H), math.sqrt(frac * H * W * aspect))
    w = min(float(W), h / aspect)
    cy = {'bottom': H - h / 2, 'top': h / 2}.get(placement, rng.uniform(h / 2, H - h / 2))
    cx = {'left': w / 2, 'right': W - w / 2}.get(placement, rng.uniform(w / 2, W - w / 2))
    if placement == 'center':
      cy, cx = H / 2 + rng.uniform(-0.25, 0.25) * H, W / 2 + rng.uniform(-0.25, 0.25) * W
  h, w = max(1, int(round(h))), max(1, int(round(w)))
  rgb, alpha = _resized(np.ascontiguousarray(rgb), h, w), _resized(np.ascontiguousarray(alpha),
                                                                   h, w)
  y0, x0 = int(round(cy - h / 2)), int(round(cx - w / 2))
  # Clip the pasted box to the image; the cut-out's part outside is dropped.
  ty0, tx0, ty1, tx1 = max(y0, 0), max(x0, 0), min(y0 + h, H), min(x0 + w, W)
  mask = np.zeros((H, W), bool)
  occ = image.copy()
  if ty0 < ty1 and tx0 < tx1:
    a = alpha[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]
    mask[ty0:ty1, tx0:tx1] = a
    occ[ty0:ty1, tx0:tx1][a] = rgb[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0][a]
  return occ, mask


@dataclasses.dataclass(frozen=True)
class DonorBox:
  """Where a donor's pixels go: occ[y:y+h, x:x+w] = donor[sy:sy+h, sx:sx+w]."""
  y: int
  x: int
  h: int
  w: int
  sy: int
  sx: int

  def as_array(self) -> np.ndarray:
    return np.array([self.y, self.x, self.h, self.w, self.sy, self.sx], np.int32)


def draw_occlusion(image: np.ndarray, plan: OcclusionPlan, spec: OcclusionSpec,
                   rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, DonorBox | None]:
  """Everything of the planned occluder but the donor's pixels: (occ, mask, box).

  For the person and crop types `occ` is still `image` and `box` says where the donor's
  pixels go (`paste_donor`); for the others `occ` is final and `box` is None. Every random
  number of the row is drawn here, in the same order whoever supplies the donor later, so a
  caller may paste on another machine (the devices) and get the same pixels.
  """
  H, W = image.shape[:2]
  if plan.pattern == 0:
    return image.copy(), np.zeros((H, W), np.uint8), None
  name = spec.patterns[plan.pattern - 1]
  placement = spec.placements[int(rng.integers(len(spec.placements)))]
  frac = float(rng.uniform(spec.area[0], spec.area[1]))
  if name == 'object':
    occ, mask = _object(image, placement, frac, rng)
    return occ, mask.astype(np.uint8), None
  if name == 'bank':
    occ, mask = _bank(image, spec, placement, frac, rng)
    return occ, mask.astype(np.uint8), None
  occ = image.copy()
  mask = np.zeros((H, W), np.uint8)
  box = None
  if name == 'texture':
    y, x, h, w = _band_or_box(H, W, placement, frac, rng)
    occ[y:y + h, x:x + w] = _texture_patch(h, w, rng)
  elif name == 'person':
    # The donor's central columns hold its pedestrian; rows stay aligned so the occluding
    # person's body parts sit at plausible heights.
    y, x, h, w = _person_box(H, W, placement, frac, rng)
    box = DonorBox(y, x, h, w, y, (W - w) // 2)
  else:  # crop
    y, x, h, w = _band_or_box(H, W, placement, frac, rng)
    sy = int(rng.integers(0, H - h + 1))
    sx = int(rng.integers(0, W - w + 1))
    box = DonorBox(y, x, h, w, sy, sx)
  mask[y:y + h, x:x + w] = 1
  return occ, mask, box


def paste_donor(occ: np.ndarray, donor: np.ndarray, box: DonorBox) -> np.ndarray:
  """`occ` with the donor's pixels of `box` pasted in (a new array)."""
  out = occ.copy()
  out[box.y:box.y + box.h, box.x:box.x + box.w] = donor[box.sy:box.sy + box.h,
                                                        box.sx:box.sx + box.w]
  return out


def render_occlusion(image: np.ndarray, plan: OcclusionPlan, spec: OcclusionSpec,
                     rng: np.random.Generator,
                     donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Pastes the planned occluder into uint8 [H, W, 3] `image`.

  Returns (occ, mask): occ uint8 [H, W, 3] equal to `image` wherever mask is 0, and mask uint8
  [H, W] with 1 on occluder pixels. `donor` is the holistic image of row `plan.donor` (same
  size), required for the person and crop types.
  """
  if plan.pattern and spec.patterns[plan.pattern - 1] in DONOR_TYPES:
    if donor is None or donor.shape != image.shape:
      raise ValueError(f'occlusion type {spec.patterns[plan.pattern - 1]!r} needs a donor '
                       f'image of shape {image.shape}, got '
                       f'{None if donor is None else donor.shape}')
  occ, mask, box = draw_occlusion(image, plan, spec, rng)
  return (occ if box is None else paste_donor(occ, donor, box)), mask


def synthesise_batch(images: np.ndarray, pids, spec: OcclusionSpec,
                     rng: np.random.Generator | Sequence[np.random.Generator]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Occludes a whole uint8 batch [n, H, W, 3]; donors are other rows of the same batch.

  `rng` is either one Generator (split into one child per row) or one Generator per row; the
  input pipeline passes per-row generators so that a row's result does not depend on how the
  batch is split across processes. Returns (occluded uint8 [n, H, W, 3], pattern int32 [n],
  mask uint8 [n, H, W]).
  """
  images = np.asarray(images)
  n = images.shape[0]
  rngs = rng.spawn(n) if isinstance(rng, np.random.Generator) else list(rng)
  if len(rngs) != n:
    raise ValueError(f'synthesise_batch needs one generator per row: {len(rngs)} for {n} rows')
  occ = np.empty_like(images)
  masks = np.empty(images.shape[:3], np.uint8)
  patterns = np.empty(n, np.int32)
  for i in range(n):
    plan = plan_occlusion(spec, pids, i, rngs[i])
    donor = images[plan.donor] if plan.donor >= 0 else None
    occ[i], masks[i] = render_occlusion(images[i], plan, spec, rngs[i], donor)
    patterns[i] = plan.pattern
  return occ, patterns, masks
