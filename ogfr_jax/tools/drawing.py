"""Drawing of the tools' figures with PIL: image tiles with frames and captions, laid out in
rows and columns under banners. The figures are grids of images with labels, which need no
plotting library (plot_training, which draws curves, uses matplotlib)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


GREEN = (20, 160, 60)
RED = (210, 40, 40)
BLUE = (40, 90, 220)
GREY = (150, 150, 150)
ORANGE = (235, 140, 0)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def font(size: int = 11):
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  return ImageFont.load_default(size=size)


def text_width(text: str, size: int = 11) -> int:
  box = font(size).getbbox(text)
  return int(box[2] - box[0])


def fit_height(image: np.ndarray, height: int) -> np.ndarray:
  """uint8 [h, w, 3] resized to `height` rows, keeping the aspect ratio (nearest neighbour
  when enlarging, so token-sized details stay crisp; bilinear when shrinking)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  if h == height:
    return image
  width = max(1, int(round(w * height / h)))
  method = Image.Resampling.NEAREST if height > h else Image.Resampling.BILINEAR
  return np.asarray(Image.fromarray(image).resize((width, height), method))


def bordered(image: np.ndarray, colour: tuple[int, int, int], width: int = 3,
             dashed: bool = False) -> np.ndarray:
  """The image inside a frame of `colour`; a dashed frame marks items that are not ranked."""
  h, w = image.shape[:2]
  out = np.empty((h + 2 * width, w + 2 * width, 3), np.uint8)
  out[:] = colour
  if dashed:
    period = 6
    ys = (np.arange(h + 2 * width) // period) % 2 == 1
    xs = (np.arange(w + 2 * width) // period) % 2 == 1
    out[ys, :] = WHITE
    out[:, xs] = WHITE
  out[width:width + h, width:width + w] = image
  return out


def labelled(tile: np.ndarray, lines: Sequence[str], colours: Sequence[tuple] | None = None,
             size: int = 11, width: int | None = None, fit: bool = False) -> np.ndarray:
  """The tile above a white caption of one line per entry. The caption is as wide as the
  tile, or `width`; with `fit`, wider still if a line needs it (otherwise lines are cut)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  width = tile.shape[1] if width is None else max(width, tile.shape[1])
  if fit:
    width = max([width] + [text_width(line, size) + 4 for line in lines])
  line_h = size + 3
  canvas = Image.new('RGB', (width, tile.shape[0] + line_h * len(lines) + 2), WHITE)
  canvas.paste(Image.fromarray(tile), ((width - tile.shape[1]) // 2, 0))
  draw = ImageDraw.Draw(canvas)
  f = font(size)
  colours = list(colours or [BLACK] * len(lines))
  for i, line in enumerate(lines):
    while line and text_width(line, size) > width:
      line = line[:-1]
    x = max(0, (width - text_width(line, size)) // 2)
    draw.text((x, tile.shape[0] + 1 + i * line_h), line, fill=colours[i], font=f)
  return np.asarray(canvas)


def hstack(tiles: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
  """Tiles side by side on white, top-aligned."""
  height = max(t.shape[0] for t in tiles)
  width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
  out = np.full((height, width, 3), 255, np.uint8)
  x = 0
  for t in tiles:
    out[:t.shape[0], x:x + t.shape[1]] = t
    x += t.shape[1] + gap
  return out


def vstack(rows: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
  """Rows one below the other on white, left-aligned."""
  width = max(r.shape[1] for r in rows)
  height = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
  out = np.full((height, width, 3), 255, np.uint8)
  y = 0
  for r in rows:
    out[y:y + r.shape[0], :r.shape[1]] = r
    y += r.shape[0] + gap
  return out


def banner(text: str, width: int, size: int = 12, colour=BLACK) -> np.ndarray:
  """A white strip with one line of text (titles and separators)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  canvas = Image.new('RGB', (max(width, text_width(text, size) + 8), size + 8), WHITE)
  ImageDraw.Draw(canvas).text((4, 3), text, fill=colour, font=font(size))
  return np.asarray(canvas)


def colour_key(items: Sequence[tuple[tuple[int, int, int], str]], width: int, size: int = 11,
               dashed: Sequence[bool] = ()) -> np.ndarray:
  """A white strip that says what each frame colour means: a small framed swatch (dashed where
  `dashed` says so) followed by its text, item after item, wrapped to `width`."""
  dashed = list(dashed) + [False] * (len(items) - len(dashed))
  pieces = []
  for (colour, text), dash in zip(items, dashed):
    swatch = bordered(np.full((size, size, 3), 255, np.uint8), colour, width=3, dashed=dash)
    label = banner(text, text_width(text, size) + 8, size=size, colour=BLACK)
    pad = np.full((label.shape[0], swatch.shape[1], 3), 255, np.uint8)
    pad[:swatch.shape[0]] = swatch[:label.shape[0]]
    pieces.append(hstack([pad, label], gap=2))
  rows, row = [], []
  for piece in pieces:
    if row and sum(p.shape[1] + 12 for p in row) + piece.shape[1] > width:
      rows.append(hstack(row, gap=12))
      row = []
    row.append(piece)
  if row:
    rows.append(hstack(row, gap=12))
  return vstack(rows, gap=2)
