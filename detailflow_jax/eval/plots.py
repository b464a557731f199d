"""Line charts drawn with Pillow (no plotting library needed): the coarse-to-fine curves.

`line_chart_grid` lays out panels in a grid; each panel plots one or more series of (x, y)
points with axes, tick labels, a title and a legend. Missing values (None / NaN) break a line.
Only panels with data are drawn (a metric that was not computed, e.g. rFID with
eval.compute_fid=False, leaves no empty frame), and a series without data leaves no legend entry.
"""
import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_SIZE = (420, 300)
MARGIN = dict(left=58, right=14, top=30, bottom=40)
MIN_LABEL_GAP = 20  # pixels between x tick labels
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
          (140, 86, 75))


def nice_ticks(low, high, count=5):
  """Round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
  if not math.isfinite(low) or not math.isfinite(high):
    return [0.0]
  if high <= low:
    high = low + (abs(low) * 0.1 or 1.0)
  raw = (high - low) / max(count - 1, 1)
  power = 10 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = math.floor(low / step) * step
  ticks = []
  value = first
  while value <= high + step * 1e-9:
    ticks.append(round(value, 10))
    value += step
  if ticks[-1] < high:
    ticks.append(round(value, 10))
  return ticks


def _format_tick(value):
  if value == int(value) and abs(value) < 1e6:
    return str(int(value))
  return f"{value:.3g}"


def _finite(values):
  return [v for v in values if v is not None and math.isfinite(v)]


def series_has_data(xs, ys):
  """True when some (x, y) point of the series is finite (it would draw at least a dot)."""
  return any(x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
             for x, y in zip(xs, ys))


def with_data(panels):
  """The panels that have data, each keeping only its series with data (order kept)."""
  kept = []
  for panel in panels:
    series = {name: xy for name, xy in panel["series"].items() if series_has_data(*xy)}
    if series:
      kept.append(dict(panel, series=series))
  return kept


class ChartGrid(NamedTuple):
  image: Image.Image
  titles: list  # the titles of the panels drawn, in order


def draw_panel(draw, origin, panel, font):
  """Draws one panel: dict(title, xlabel, series={name: (xs, ys)}, log_x=False)."""
  left = origin[0] + MARGIN["left"]
  top = origin[1] + MARGIN["top"]
  right = origin[0] + PANEL_SIZE[0] - MARGIN["right"]
  bottom = origin[1] + PANEL_SIZE[1] - MARGIN["bottom"]
  log_x = panel.get("log_x", False)
  series = panel["series"]
  xs_all = _finite([x for xs, _ in series.values() for x in xs])
  ys_all = _finite([y for _, ys in series.values() for y in ys])
  draw.text((origin[0] + PANEL_SIZE[0] // 2, origin[1] + 8), panel["title"], fill="black",
            font=font, anchor="mt")
  draw.rectangle([left, top, right, bottom], outline="black")
  if not xs_all or not ys_all:
    draw.text(((left + right) // 2, (top + bottom) // 2), "no data", fill="gray", font=font,
              anchor="mm")
    return
  fx = (lambda x: math.log2(x)) if log_x else float
  x_low, x_high = fx(min(xs_all)), fx(max(xs_all))
  if x_high == x_low:
    x_low, x_high = x_low - 1, x_high + 1
  pad = 0.03 * (x_high - x_low)  # keep the end points off the frame
  x_low, x_high = x_low - pad, x_high + pad
  y_ticks = nice_ticks(min(ys_all), max(ys_all))
  y_low, y_high = y_ticks[0], y_ticks[-1]
  if y_high == y_low:
    y_high = y_low + 1

  def to_pixel(x, y):
    px = left + (fx(x) - x_low) / (x_high - x_low) * (right - left)
    py = bottom - (y - y_low) / (y_high - y_low) * (bottom - top)
    return px, py

  for tick in y_ticks:
    _, py = to_pixel(min(xs_all), tick)
    draw.line([left, py, right, py], fill=(225, 225, 225))
    draw.text((left - 4, py), _format_tick(tick), fill="black", font=font, anchor="rm")
  x_ticks = sorted(set(xs_all))
  if len(x_ticks) > 10:  # keep labels readable: about 10 of them, ends included
    keep = np.unique(np.linspace(0, len(x_ticks) - 1, 10).round().astype(int))
    x_ticks = [x_ticks[i] for i in keep]
  labelled_px = math.inf
  for tick in reversed(x_ticks):  # from the right, so the last tick (e.g. n = N) keeps its label
    px, _ = to_pixel(tick, y_low)
    draw.line([px, bottom, px, bottom + 4], fill="black")
    if labelled_px - px >= MIN_LABEL_GAP:
      draw.text((px, bottom + 6), _format_tick(tick), fill="black", font=font, anchor="mt")
      labelled_px = px
  draw.text(((left + right) // 2, bottom + 22), panel.get("xlabel", ""), fill="black", font=font,
            anchor="mt")
  for i, (name, (xs, ys)) in enumerate(series.items()):
    color = COLORS[i % len(COLORS)]
    segment = []
    for x, y in list(zip(xs, ys)) + [(None, None)]:
      if x is None or y is None or not math.isfinite(y):
        if len(segment) > 1:
          draw.line(segment, fill=color, width=2)
        segment = []
        continue
      point = to_pixel(x, y)
      segment.append(point)
      draw.ellipse([point[0] - 2.5, point[1] - 2.5, point[0] + 2.5, point[1] + 2.5], fill=color)
    legend_y = top + 6 + 14 * i
    draw.line([left + 8, legend_y, left + 24, legend_y], fill=color, width=2)
    draw.text((left + 28, legend_y), name, fill="black", font=font, anchor="lm")


def line_chart_grid(panels, path, columns=2):
  """Renders the panels with data (see draw_panel, with_data) into a PNG grid at `path`;
  returns ChartGrid(the PIL image, the titles drawn)."""
  if not panels:
    raise ValueError("line_chart_grid needs at least one panel")
  titles = [panel["title"] for panel in panels]
  panels = with_data(panels)
  if not panels:
    raise ValueError(f"no panel has data: {titles}")
  rows = -(-len(panels) // columns)
  image = Image.new("RGB", (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  for i, panel in enumerate(panels):
    origin = ((i % columns) * PANEL_SIZE[0], (i // columns) * PANEL_SIZE[1])
    draw_panel(draw, origin, panel, font)
  image.save(path)
  return ChartGrid(image, [panel["title"] for panel in panels])
