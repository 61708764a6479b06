"""Decoding dataset images into RGB uint8 arrays.

Every reader in ogfr_jax.data hands out file paths; this module is the single place where those
files become pixels, so that odd files in real archives (grayscale crops, palette PNGs, 16-bit
TIFFs, files cut short by an interrupted copy) are handled the same way everywhere and a bad file
fails with its name instead of deep inside a worker process.

Conversions (each noted once per process in the log, because a dataset mixing modes is worth
knowing about but not worth a line per image):
- 'L' / '1' grayscale: replicated to three channels (lossless).
- 'P' palette: expanded through the palette; with a transparency entry it is treated as RGBA.
- 'RGBA', 'LA', 'PA', 'RGBa': composited on black, i.e. colour multiplied by alpha. Dropping
  alpha instead would expose whatever colour the writer left under transparent pixels (often
  white, sometimes garbage), which varies between tools; black is deterministic and matches the
  zero padding the augmentations use.
- 'I;16*' (16-bit) and 'I' (32-bit int, how some writers store 16-bit data): the full 16-bit range
  0..65535 is mapped linearly onto 0..255 (values outside are clipped). A fixed mapping keeps the
  brightness of one image independent of its own content, unlike per-image min/max stretching.
- 'F' (float): values in [0, 1] are scaled by 255; anything else is clipped to [0, 255].
- 'CMYK', 'YCbCr', 'HSV': PIL's own conversion to RGB.
EXIF orientation is not applied: ReID crops are stored upright and no public archive sets it.
"""

from __future__ import annotations

import io
import os
import struct
from typing import Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image

_BILINEAR = Image.Resampling.BILINEAR

# Errors PIL raises for files it cannot decode: unknown format (UnidentifiedImageError is an
# OSError), truncated data ('image file is truncated'), broken headers (SyntaxError, struct.error,
# ValueError, EOFError) and absurd declared sizes (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                  Image.DecompressionBombError)

_noted_modes: set[str] = set()


class CorruptImageError(ValueError):
  """A file that exists but cannot be decoded as an image (empty, truncated, not an image)."""


def _note_conversion(mode: str, how: str, lossy: bool) -> None:
  if mode in _noted_modes:
    return
  _noted_modes.add(mode)
  log = logging.warning if lossy else logging.info
  log('image_io: converting images of mode %s to RGB uint8: %s (noted once per process)',
      mode, how)


def _alpha_on_black(img: Image.Image) -> np.ndarray:
  rgba = np.asarray(img.convert('RGBA'), dtype=np.uint16)
  rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
  return rgb.astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
  return np.repeat(gray[..., None], 3, axis=-1)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
  """Converts a loaded PIL image of any supported mode to an RGB uint8 array."""
  mode = img.mode
  if mode == 'RGB':
    return np.array(img, dtype=np.uint8)
  if mode in ('L', '1'):
    _note_conversion(mode, 'grayscale replicated to 3 channels', lossy=False)
    return np.array(img.convert('RGB'), dtype=np.uint8)
  if mode == 'P':
    if 'transparency' in img.info:
      _note_conversion('P+transparency', 'palette with transparency composited on black',
                       lossy=True)
      return _alpha_on_black(img)
    _note_conversion(mode, 'palette expanded to RGB', lossy=False)
    return np.array(img.convert('RGB'), dtype=np.uint8)
  if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    _note_conversion(mode, 'alpha composited on black', lossy=True)
    return _alpha_on_black(img)
  if mode.startswith('I;16') or mode == 'I':
    _note_conversion(mode, '16-bit range 0..65535 mapped linearly to 0..255', lossy=True)
    values = np.asarray(img).astype(np.int64)
    values = np.clip(values, 0, 65535)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return _gray_to_rgb(gray)
  if mode == 'F':
    _note_conversion(mode, 'float [0, 1] scaled by 255, otherwise clipped to [0, 255]',
                     lossy=True)
    values = np.asarray(img, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.max() <= 1.0:
      values = values * 255.0
    return _gray_to_rgb(np.clip(np.rint(values), 0, 255).astype(np.uint8))
  _note_conversion(mode, "PIL's conversion to RGB", lossy=True)
  return np.array(img.convert('RGB'), dtype=np.uint8)


def _decode(data: bytes, name: str, size: Optional[Sequence[int]]) -> np.ndarray:
  if not data:
    raise CorruptImageError(f'{name}: file is empty (0 bytes), not an image')
  if size is not None:
    if len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0:
      raise ValueError(f'size must be (height, width) with positive entries, got {size!r}')
    height, width = int(size[0]), int(size[1])
  try:
    with Image.open(io.BytesIO(data)) as img:
      if size is not None and img.format == 'JPEG' and img.mode in ('RGB', 'L'):
        # Decode at the smallest power-of-two scale that is still at least the requested size:
        # for large JPEGs this skips most of the IDCT work, and the bilinear resize below then
        # only has to cover the last factor of less than two.
        img.draft(img.mode, (width, height))
      img.load()
      rgb = _to_rgb_array(img)
  except _DECODE_ERRORS as e:
    raise CorruptImageError(f'{name}: cannot decode image ({type(e).__name__}: {e})') from e
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
    raise CorruptImageError(f'{name}: decoded to an unusable array of shape {rgb.shape}')
  if size is not None and rgb.shape[:2] != (height, width):
    rgb = np.asarray(Image.fromarray(rgb).resize((width, height), _BILINEAR), dtype=np.uint8)
  return np.ascontiguousarray(rgb)


def load_image_bytes(data: bytes, size: Optional[Sequence[int]] = None,
                     name: str = '<bytes>') -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, TIFF, BMP, ...) to RGB uint8 [H, W, 3].

  size: optional (height, width); the image is resized to exactly that with bilinear filtering.
  name: used in error messages (pass the file name the bytes came from).
  Raises CorruptImageError if the bytes are empty, truncated or not an image.
  """
  return _decode(bytes(data), name, size)


def load_image(path: str | os.PathLike, size: Optional[Sequence[int]] = None) -> np.ndarray:
  """Reads an image file and returns RGB uint8 [H, W, 3]; see the module docstring for modes.

  size: optional (height, width); the image is resized to exactly that with bilinear filtering
  (large JPEGs are first decoded at a reduced scale).
  Raises FileNotFoundError for a missing file and CorruptImageError (a ValueError) naming the
  file when it is empty, truncated or not an image.
  """
  path = os.fspath(path)
  # Reading the bytes first keeps I/O errors (missing file, permissions) apart from decode errors.
  with open(path, 'rb') as f:
    data = f.read()
  return _decode(data, path, size)
