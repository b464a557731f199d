"""Image grids with text labels: class names left of the rows, token counts above the columns.

The sample job's grid.png and coarse_to_fine.png are read by people, so each row says which
class it was conditioned on and each strip column says how many tokens n it was decoded from
and at which resolution R(n). Cells are upscaled by an integer factor with nearest neighbour
(32 px samples stay crisp at x3) and the text is Pillow's default font.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detailflow_jax import images as image_io

SCALE = 3        # nearest-neighbour upscaling of every cell
FONT_SIZE = 13   # px; Pillow's default (FreeType) font, small enough for a 96 px cell column
LABEL_GAP = 6    # px between a label and the images (and the label and the image border)
LINE_HEIGHT = FONT_SIZE + 3


def default_font():
  """Pillow's default font at FONT_SIZE (its fixed-size bitmap font without FreeType)."""
  try:
    return ImageFont.load_default(FONT_SIZE)
  except (TypeError, ImportError, OSError):
    return ImageFont.load_default()


def upscale(images, scale=SCALE):
  """uint8 (..., H, W, C) -> (..., H*scale, W*scale, C) by pixel repetition (nearest)."""
  images = np.asarray(images)
  return np.repeat(np.repeat(images, scale, axis=-3), scale, axis=-2)


def left_margin(row_labels, font=None):
  """Width in px of the label column: the widest label plus a gap on each side (0: no labels)."""
  if not row_labels:
    return 0
  font = font or default_font()
  draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  return int(np.ceil(max(draw.textlength(str(label), font=font) for label in row_labels))
             ) + 2 * LABEL_GAP


def top_margin(col_labels):
  """Height in px of the header: one line per line of the tallest column label (0: none)."""
  if not col_labels:
    return 0
  lines = max(len(str(label).split("\n")) for label in col_labels)
  return lines * LINE_HEIGHT + LABEL_GAP


def labelled_grid(images, rows, cols, row_labels=None, col_labels=None, scale=SCALE, pad=2):
  """uint8 (rows*cols, H, W, C) in row-major order -> uint8 RGB image of the grid with
  `row_labels` (one per row, right-aligned left of it) and `col_labels` (one per column,
  centred above it; "\\n" starts a new line). Cells are upscaled by `scale` (nearest)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if row_labels is not None and len(row_labels) != rows:
    raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
  if col_labels is not None and len(col_labels) != cols:
    raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
  cells = upscale(images, scale)
  body = image_io.grid(cells, rows, cols, pad=pad)
  font = default_font()
  left, top = left_margin(row_labels, font), top_margin(col_labels)
  canvas = Image.new("RGB", (body.shape[1] + left, body.shape[0] + top), "white")
  canvas.paste(Image.fromarray(body), (left, top))
  draw = ImageDraw.Draw(canvas)
  cell_h, cell_w = cells.shape[1] + pad, cells.shape[2] + pad
  for r, label in enumerate(row_labels or ()):
    y = top + pad + r * cell_h + cells.shape[1] // 2
    draw.text((left - LABEL_GAP, y), str(label), fill="black", font=font, anchor="rm")
  for c, label in enumerate(col_labels or ()):
    x = left + pad + c * cell_w + cells.shape[2] // 2
    for i, line in enumerate(str(label).split("\n")):
      draw.text((x, LABEL_GAP // 2 + i * LINE_HEIGHT), line, fill="black", font=font, anchor="mt")
  return np.asarray(canvas)


def labelled_strip(rows_of_images, size, row_labels=None, col_labels=None, scale=SCALE):
  """A coarse-to-fine strip (images.coarse_to_fine_strip: every image shown at `size`) with row
  and column labels, cells upscaled by `scale`."""
  rows = [[image_io.resize_nearest(im, size) for im in row] for row in rows_of_images]
  flat = np.stack([im for row in rows for im in row])
  return labelled_grid(flat, len(rows), len(rows[0]), row_labels, col_labels, scale)
