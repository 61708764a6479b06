"""Per-image train and eval transforms (TransReID recipe) on numpy arrays, and the
normalisation that turns their uint8 pixels into model input on the device.

Every random op takes an explicit `np.random.Generator`, so an example's augmentation is a
pure function of the generator the pipeline derives from (seed, step, position); nothing reads
global random state. The random ops work on uint8 images: flips, pads and crops are then plain
copies, the occlusion synthesiser pastes pixels in the same space, and batches cross from the
host to the devices as uint8, a quarter of the bytes of float32. The float conversion happens
once, inside the jitted train step and feature extraction (`normalize_on_device`); `normalize`
is the same arithmetic on the host, for tools that feed the model directly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


# config.input.train_resize -> PIL filter.
RESAMPLING = {'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC}


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """The `config.input` fields the transforms use (a small picklable value for workers)."""
  height: int
  width: int
  flip_prob: float = 0.5
  pad: int = 10
  erase_prob: float = 0.5
  erase_area: tuple[float, float] = (0.02, 0.4)
  erase_min_aspect: float = 0.3
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  train_resize: str = 'bilinear'  # 'bilinear' or 'bicubic'

  def __post_init__(self):
    if self.height < 1 or self.width < 1:
      raise ValueError(
          f'config.input.height/width must be positive, got {self.height}x{self.width}')
    for name in ('flip_prob', 'erase_prob'):
      p = getattr(self, name)
      if not 0.0 <= p <= 1.0:
        raise ValueError(f'config.input.{name} must lie in [0, 1], got {p}')
    if self.pad < 0:
      raise ValueError(f'config.input.pad must be >= 0, got {self.pad}')
    lo, hi = self.erase_area
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f'config.input.erase_area must satisfy 0 < lo <= hi <= 1, got '
                       f'{self.erase_area}')
    if not 0.0 < self.erase_min_aspect <= 1.0:
      raise ValueError(
          f'config.input.erase_min_aspect must lie in (0, 1], got {self.erase_min_aspect}')
    if self.train_resize not in RESAMPLING:
      raise ValueError(f'config.input.train_resize={self.train_resize!r}: use one of '
                       f'{sorted(RESAMPLING)}')
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f'config.input.mean/std need 3 values with std > 0, got mean '
                       f'{self.mean} std {self.std}')


def augment_spec(config) -> AugmentSpec:
  """Reads `config.input` into an AugmentSpec."""
  c = config.input
  return AugmentSpec(
      height=int(c.height), width=int(c.width), flip_prob=float(c.flip_prob), pad=int(c.pad),
      erase_prob=float(c.erase_prob),
      erase_area=tuple(float(v) for v in c.erase_area),
      mean=tuple(float(v) for v in c.mean), std=tuple(float(v) for v in c.std),
      train_resize=str(c.train_resize))


def resize(image: np.ndarray, height: int, width: int, method: str = 'bilinear') -> np.ndarray:
  """Resize of a uint8 [h, w, 3] image with PIL's `method` ('bilinear' or 'bicubic'; both
  antialiased when shrinking, as torchvision's Resize of a PIL image)."""
  if image.shape[:2] == (height, width):
    return image
  out = Image.fromarray(image).resize((width, height), RESAMPLING[method])
  return np.asarray(out)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
  """A [h, w] pixel mask resized as `resize` resizes its image: bilinear on 0 / 255, then
  kept where at least half covered. Returns uint8 0 / 1 [height, width]."""
  m = np.asarray(mask)
  if m.shape[:2] == (height, width):
    return (m > 0).astype(np.uint8)
  grey = Image.fromarray((m > 0).astype(np.uint8) * 255, mode='L')
  out = np.asarray(grey.resize((width, height), Image.Resampling.BILINEAR))
  return (out >= 128).astype(np.uint8)


def random_flip(image: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
  """Mirrors left-right with probability `prob`."""
  if rng.random() < prob:
    return image[:, ::-1]
  return image


def _draw_shift(pad: int, rng: np.random.Generator) -> tuple[int, int]:
  """The (dy, dx) of `pad_crop`: window row r shows source row r + dy."""
  dy, dx = (int(v) - pad for v in rng.integers(0, 2 * pad + 1, size=2))
  return dy, dx


def pad_crop(image: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
  """Zero-pads by `pad` on every side, then crops a random window of the original size.

  Equivalent to padding and cropping but written as one copy into a zero canvas: only the
  overlap of the shifted image with the window is non-zero.
  """
  if pad == 0:
    return image
  return _shift(image, *_draw_shift(pad, rng))


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  # Window row r shows source row r + dy.
  ys, ye = max(0, -dy), min(h, h - dy)
  xs, xe = max(0, -dx), min(w, w - dx)
  if ys < ye and xs < xe:
    out[ys:ye, xs:xe] = image[ys + dy:ye + dy, xs + dx:xe + dx]
  return out


def erase_box(height: int, width: int, area: Sequence[float], min_aspect: float,
              rng: np.random.Generator, attempts: int = 10) -> tuple[int, int, int, int] | None:
  """Draws a (y, x, h, w) box as random erasing does: target area and log-uniform aspect.

  Returns None when no draw fits inside the image within `attempts` tries.
  """
  total = height * width
  log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
  for _ in range(attempts):
    target = rng.uniform(area[0], area[1]) * total
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    h = int(round(math.sqrt(target * aspect)))
    w = int(round(math.sqrt(target / aspect)))
    if 0 < h < height and 0 < w < width:
      y = int(rng.integers(0, height - h + 1))
      x = int(rng.integers(0, width - w + 1))
      return y, x, h, w
  return None


def random_erase(image: np.ndarray, prob: float, area: Sequence[float], min_aspect: float,
                 rng: np.random.Generator) -> np.ndarray:
  """Random erasing (Zhong et al.): a random box is filled with per-pixel random values.

  The fill is uniform integers 0..255 per pixel and channel, drawn in pixel space because the
  whole pipeline stays uint8 until the device normalises it. After normalisation that is a
  uniform fill over the full input range ([-1, 1] for mean = std = 0.5): the random-value
  variant of the paper. TransReID (timm's RandomErasing, mode 'pixel') instead draws N(0, 1)
  values in normalised space, which spills outside the range a real pixel can take; the two
  fills have the same mean (the mean pixel) for mean = std = 0.5 and differ in spread
  (std 0.58 here against 1.0) and range.
  """
  if rng.random() >= prob:
    return image
  box = erase_box(image.shape[0], image.shape[1], area, min_aspect, rng)
  if box is None:
    return image
  y, x, h, w = box
  out = np.array(image, copy=True)
  out[y:y + h, x:x + w] = rng.integers(0, 256, size=(h, w, image.shape[2]), dtype=np.uint8)
  return out


def normalization_constants(mean: Sequence[float],
                            std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset), float32 [3], with x * scale + offset = ((x / 255) - mean) / std.

  One definition for the host and the device versions, so both round the same constants.
  """
  std32 = np.asarray(std, np.float32)
  scale = (1.0 / (255.0 * std32)).astype(np.float32)
  offset = (-np.asarray(mean, np.float32) / std32).astype(np.float32)
  return scale, offset


def normalize_on_device(x: jax.Array, mean: Sequence[float], std: Sequence[float],
                        dtype=jnp.float32) -> jax.Array:
  """Pixels [..., 3] -> model input ((x / 255) - mean) / std in `dtype`; for use under jit.

  Batches travel to the devices as uint8 and become floats here, next to the model. Float
  input is read as pixel values 0..255 as well (not as already-normalised input), so a NaN or
  inf planted in a batch reaches the model unchanged. The result equals `normalize` on the
  host to within one float32 rounding (the device may fuse the multiply-add).
  """
  scale, offset = normalization_constants(mean, std)
  out = jnp.asarray(x).astype(jnp.float32) * scale + offset
  return out.astype(dtype)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [..., 3] -> float32 ((x / 255) - mean) / std, computed as x * scale + offset.

  The host version of `normalize_on_device`, for tools that call the model on host arrays.
  In place and with scalar operands: broadcasting a length-3 vector over the channel axis
  makes numpy run an inner loop of 3 elements, several times slower on whole batches.
  """
  scale, offset = normalization_constants(mean, std)
  out = image.astype(np.float32)
  if (scale == scale[0]).all() and (offset == offset[0]).all():
    out *= scale[0]
    out += offset[0]
    return out
  for c in range(out.shape[-1]):
    channel = out[..., c]
    channel *= scale[c]
    channel += offset[c]
  return out


def train_augment(image: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
  """Resize, flip, pad + random crop, random erasing; returns uint8 [H, W, 3] (unnormalised).

  Erasing comes last, as in TransReID. The result is the holistic view x; the occlusion
  synthesiser derives occ(x) from it and both are normalised on the device.
  """
  return train_augment_pair(image, None, spec, rng)[0]


def train_augment_pair(image: np.ndarray, mask: np.ndarray | None, spec: AugmentSpec,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
  """`train_augment` of an image and of a pixel mask of it, with the same draws.

  The mask ([h, w], at the image's stored size; None for none) follows the geometry: it is
  resized like the image (`resize_mask`), flipped and shifted with it (pixels the crop brings
  in from the zero padding are 0); random erasing, which replaces pixel values in place,
  leaves it as it is. Returns (uint8 [H, W, 3], uint8 0 / 1 [H, W] or None). The image and
  the generator's draws are exactly those of `train_augment`.
  """
  x = resize(image, spec.height, spec.width, spec.train_resize)
  m = None if mask is None else resize_mask(mask, spec.height, spec.width)
  if rng.random() < spec.flip_prob:
    x = x[:, ::-1]
    m = None if m is None else m[:, ::-1]
  if spec.pad:
    dy, dx = _draw_shift(spec.pad, rng)
    x = _shift(x, dy, dx)
    m = None if m is None else _shift(m, dy, dx)
  x = random_erase(x, spec.erase_prob, spec.erase_area, spec.erase_min_aspect, rng)
  return np.ascontiguousarray(x), None if m is None else np.ascontiguousarray(m)


def eval_transform(image: np.ndarray, spec: AugmentSpec) -> np.ndarray:
  """Resize and normalise on the host; returns float32 [H, W, 3] model input.

  For callers that feed the model directly; the evaluation pipeline sends uint8 instead.
  """
  return normalize(resize(image, spec.height, spec.width), spec.mean, spec.std)
