"""How eval_tokenizer shows its per-n figures: the printed table and curve.png.

Both read the job's per_n entries (metrics.json); a figure that was not computed (None) prints as
"-" and, when no n has it, leaves no panel in the PNG (eval/plots.py draws panels with data only).
"""
from detailflow_jax.eval import plots

TABLE_COLUMNS = (  # (header, per-n key, format)
    ("n", "n", "d"), ("R(n)", "content_resolution", "d"), ("d(n)", "decoder_size", "d"),
    ("PSNR full", "psnr_full", ".2f"), ("PSNR R(n)", "psnr_degraded", ".2f"),
    ("SSIM full", "ssim_full", ".4f"), ("LPIPS", "lpips_full", ".4f"), ("rFID", "rfid", ".2f"),
    ("rRecall", "rrecall", ".3f"), ("usage", "codebook_usage", ".3f"), ("cls acc", "classifier_accuracy", ".4f"),
    ("cls FD", "classifier_fd", ".3f"))


def format_table(per_n, summary=None):
  """The per-n figures as a text table ("-": not computed); with the summary, the judge's
  accuracy on the real images (the ceiling of "cls acc") on a last line."""
  header = [h for h, _, _ in TABLE_COLUMNS]
  rows = [[("-" if r.get(key) is None else format(r[key], fmt)) for _, key, fmt in TABLE_COLUMNS]
          for r in per_n.values()]
  widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
  lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header] + rows]
  if summary and summary.get("classifier_real_accuracy") is not None:
    lines.append(f"judge on the real images (ceiling): accuracy "
                 f"{summary['classifier_real_accuracy']:.4f}, classifier FD "
                 f"{summary['classifier_real_fd']:.3f}")
  return "\n".join(lines)


def plot_curves(per_n, path, real_accuracy=None):
  """The coarse-to-fine curves (metric against n, log2 axis) as a PNG grid of the panels that
  have data; real_accuracy: the judge on the real images, drawn flat as the ceiling. Returns
  plots.ChartGrid (the image and the titles of the panels drawn)."""
  rows = list(per_n.values())
  ns = [r["n"] for r in rows]

  def series(*keys):
    return {label: (ns, [r.get(key) for r in rows]) for key, label in keys}

  accuracy = series(("classifier_accuracy", "reconstructions"))
  if real_accuracy is not None:
    accuracy["real images (ceiling)"] = (ns, [real_accuracy] * len(ns))

  panels = [
      dict(title="PSNR (dB)", series=series(("psnr_full", "vs full image"),
                                             ("psnr_degraded", "vs R(n) target"))),
      dict(title="SSIM", series=series(("ssim_full", "vs full image"),
                                        ("ssim_degraded", "vs R(n) target"))),
      dict(title="LPIPS (vs full image)", series=series(("lpips_full", "LPIPS-VGG"),)),
      dict(title="rFID (vs real images)", series=series(("rfid", "rFID"),)),
      dict(title="codebook usage (codes < n)", series=series(("codebook_usage", "usage"),)),
      dict(title="code perplexity (codes < n)", series=series(("perplexity", "perplexity"),)),
      dict(title="judge accuracy (full-size decode)", series=accuracy),
      dict(title="classifier FD (judge features vs test)",
           series=series(("classifier_fd", "reconstructions"),)),
  ]
  for panel in panels:
    panel.update(xlabel="tokens n", log_x=True)
  return plots.line_chart_grid(panels, path)
