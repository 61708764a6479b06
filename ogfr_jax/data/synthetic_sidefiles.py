"""Readers of a synthetic dataset's side files (masks.npz, clutter.npz), which training and
the tools import, and the token mask of a pixel mask."""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ogfr_jax.data.synthetic_config import SPLIT_DIRS


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
