"""The reproduction study's report: markdown tables, verdicts and figures from the arms' results.

Input: the `results` dict that jobs/study.py assembles from the arms' folders (and that its
report.json holds), so everything here runs on plain numbers:

  arms:  {name: {change, switches, tokenizer_eval (eval_tokenizer's metrics.json or None),
                 pipeline (the pipeline's summary.json or None), generator (eval_generator's
                 metrics and sampling or None)}}
  sweep: [{cfg_scale, metrics (eval_generator's), sampling}]   (the guidance sweep of one arm)
  speed: {name: {group_size, num_tokens, steps, images_per_second: {batch size: value}}}

Verdicts follow one rule, stated in the report: a difference counts when it is larger than
NOISE_FACTOR times the difference between the two seeds of the pipeline (detailflow and
detailflow_seed1) on the same figure; in the paper's direction it is "reproduced", against it
"not reproduced", otherwise "inconclusive". With no second seed every verdict is "inconclusive".
"""
import math

from detailflow_jax.eval import plots

NOISE_FACTOR = 2.0
BASE, SEED_ARM = "detailflow", "detailflow_seed1"
ORDERING_ARMS = ("detailflow", "no_degrade", "bidirectional")
CORRECTION_ARMS = ("detailflow", "no_correction", "detailflow_seed1")
GROUP_ARMS = ("detailflow", "g1")
# Per-n figures of the ordering claim: (per-n key, title, higher is better).
ORDERING_METRICS = (("psnr_full", "PSNR vs full image (dB)", True),
                    ("psnr_degraded", "PSNR vs R(n) target (dB)", True),
                    ("classifier_accuracy", "judge accuracy on decode(first n)", True),
                    ("classifier_fd", "classifier FD of decode(first n)", False))
# Generator figures: (metrics key, header, higher is better, format).
GENERATOR_METRICS = (("classifier_in_class_fraction", "in class", True, ".3f"),
                     ("classifier_fd", "classifier FD", False, ".2f"),
                     ("fid", "FID", False, ".2f"),
                     ("precision", "precision", True, ".3f"),
                     ("recall", "recall", True, ".3f"))


def fmt(value, spec=".3f"):
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return format(value, spec)


def markdown_table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def verdict(difference, spread, higher_is_claimed=True):
  """'reproduced' / 'not reproduced' / 'inconclusive' for a difference (arm of the paper minus the
  other arm) against the seed-to-seed spread of the same figure (see the module docstring)."""
  if difference is None:
    return "inconclusive (not measured)"
  if spread is None:
    return "inconclusive (no second seed to compare the difference with)"
  signed = difference if higher_is_claimed else -difference
  if abs(signed) <= NOISE_FACTOR * spread:
    return "inconclusive"
  return "reproduced" if signed > 0 else "not reproduced"


# ------------------------------------------------------------------------------------ ordering


def per_n(results, arm):
  payload = results["arms"].get(arm, {}).get("tokenizer_eval")
  return payload["per_n"] if payload else None


def prefix_mean(entries, key, counts):
  values = [entries[str(n)].get(key) for n in counts if str(n) in entries]
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def shared_prefix_counts(results, arms):
  """The prefix lengths n < N that every arm with results evaluated."""
  tables = [per_n(results, arm) for arm in arms if per_n(results, arm)]
  if not tables:
    return []
  common = set.intersection(*[{int(n) for n in t} for t in tables])
  return sorted(n for n in common if n < max(common))


def ordering_section(results):
  arms = [a for a in ORDERING_ARMS if per_n(results, a)]
  if not arms:
    return "No tokenizer evaluation found yet (WORKDIR/<arm>/tokenizer_eval/metrics.json).", {}
  counts = sorted({int(n) for a in arms for n in per_n(results, a)})
  lines = []
  for key, title, _ in ORDERING_METRICS:
    rows = []
    for n in counts:
      entry = next((per_n(results, a)[str(n)] for a in arms if str(n) in per_n(results, a)), {})
      rows.append([n, entry.get("content_resolution", "-")] +
                  [fmt(per_n(results, a).get(str(n), {}).get(key)) for a in arms])
    lines += [f"**{title}** per prefix length n", "",
              markdown_table(["n", "R(n)"] + arms, rows), ""]
  prefix = shared_prefix_counts(results, arms + [SEED_ARM])
  found = {}
  rows = []
  for key, title, higher in ORDERING_METRICS:
    base = prefix_mean(per_n(results, BASE), key, prefix) if per_n(results, BASE) else None
    seed = prefix_mean(per_n(results, SEED_ARM), key, prefix) if per_n(results, SEED_ARM) else None
    spread = abs(base - seed) if base is not None and seed is not None else None
    for other in ("no_degrade", "bidirectional"):
      value = prefix_mean(per_n(results, other), key, prefix) if per_n(results, other) else None
      diff = base - value if base is not None and value is not None else None
      found[(other, key)] = dict(difference=diff, spread=spread,
                                 verdict=verdict(diff, spread, higher))
      rows.append([title, other, fmt(base), fmt(value), fmt(diff), fmt(spread),
                   found[(other, key)]["verdict"]])
  lines += [f"Mean over the prefixes n < N ({', '.join(map(str, prefix)) or 'none'}): detailflow "
            "against each other arm; the seed spread is |detailflow - detailflow_seed1|.", "",
            markdown_table(["figure", "against", "detailflow", "other arm", "difference",
                            "seed spread", "verdict"], rows)]
  return "\n".join(lines), found


def ordering_verdict(found):
  """The claim's verdict: the judge's accuracy on short prefixes (PSNR vs the full image when the
  judge was not run) against the tokenizer without degraded targets."""
  for key in ("classifier_accuracy", "psnr_full"):
    entry = found.get(("no_degrade", key))
    if entry and entry["difference"] is not None:
      return entry["verdict"], key
  return "inconclusive (not measured)", None


def plot_ordering(results, path):
  """One figure: each per-n figure as a panel, one curve per tokenizer arm (log2 n axis)."""
  arms = [a for a in ORDERING_ARMS + (SEED_ARM,) if per_n(results, a)]
  panels = []
  for key, title, _ in ORDERING_METRICS:
    series = {}
    for arm in arms:
      rows = sorted(per_n(results, arm).values(), key=lambda r: r["n"])
      series[arm] = ([r["n"] for r in rows], [r.get(key) for r in rows])
    panels.append(dict(title=title, xlabel="tokens n", log_x=True, series=series))
  return plots.line_chart_grid(panels, path)


# --------------------------------------------------------------------------------- generators


def generator_metrics(results, arm):
  entry = results["arms"].get(arm, {}).get("generator")
  return entry["metrics"] if entry else None


def generator_rows(results, arms):
  rows = []
  for arm in arms:
    metrics = generator_metrics(results, arm)
    entry = results["arms"][arm].get("generator") or {}
    sampling = entry.get("sampling", {})
    if metrics is None:
      rows.append([arm] + ["-"] * (len(GENERATOR_METRICS) + 3))
      continue
    rows.append([arm] + [fmt(metrics.get(key), spec) for key, _, _, spec in GENERATOR_METRICS] +
                [sampling.get("num_samples", "-"), fmt(sampling.get("cfg_scale"), "g"),
                 sampling.get("seed", "-")])
  return rows


GENERATOR_HEADER = [h for _, h, _, _ in GENERATOR_METRICS] + ["samples", "CFG", "seed"]


def compare_generators(results, arm, other, metric_keys):
  """{key: dict(difference (arm better when positive after the sign of the figure), spread,
  verdict)} for generator figures of `arm` against `other`."""
  out = {}
  base, against = generator_metrics(results, arm), generator_metrics(results, other)
  seeds = (generator_metrics(results, BASE), generator_metrics(results, SEED_ARM))
  for key, _, higher, _ in GENERATOR_METRICS:
    if key not in metric_keys:
      continue
    a = base.get(key) if base else None
    b = against.get(key) if against else None
    diff = a - b if a is not None and b is not None else None
    s0, s1 = (m.get(key) if m else None for m in seeds)
    spread = abs(s0 - s1) if s0 is not None and s1 is not None else None
    out[key] = dict(difference=diff, spread=spread, verdict=verdict(diff, spread, higher))
  return out


def correction_section(results):
  rows = generator_rows(results, [a for a in CORRECTION_ARMS if a in results["arms"]])
  found = compare_generators(results, BASE, "no_correction", ("fid", "classifier_fd",
                                                               "classifier_in_class_fraction"))
  lines = [markdown_table(["arm"] + GENERATOR_HEADER, rows), ""]
  lines += ["detailflow (correction on) against no_correction (off):", "",
            markdown_table(["figure", "difference (on - off)", "seed spread", "verdict"],
                           [[k, fmt(v["difference"]), fmt(v["spread"]), v["verdict"]]
                            for k, v in found.items()])]
  return "\n".join(lines), found


def correction_verdict(found):
  """gFID when it was computed (the paper's figure), else the classifier FD."""
  for key in ("fid", "classifier_fd"):
    if found.get(key) and found[key]["difference"] is not None:
      return found[key]["verdict"], key
  return "inconclusive (not measured)", None


def group_size_section(results):
  speed = results.get("speed") or {}
  batches = sorted({int(b) for s in speed.values() for b in s.get("images_per_second", {})})
  header = ["arm", "g", "N", "sampling steps"] + [f"images/s (batch {b})" for b in batches] + \
      GENERATOR_HEADER[:len(GENERATOR_METRICS)]
  rows = []
  for arm in GROUP_ARMS:
    s = speed.get(arm)
    metrics = generator_metrics(results, arm) or {}
    head = [arm, s["group_size"], s["num_tokens"], s["steps"]] if s else [arm, "-", "-", "-"]
    rates = [fmt((s or {}).get("images_per_second", {}).get(str(b)), ".2f") for b in batches]
    rows.append(head + rates + [fmt(metrics.get(k), spec) for k, _, _, spec in GENERATOR_METRICS])
  found = compare_generators(results, BASE, "g1", ("fid", "recall", "classifier_fd",
                                                    "classifier_in_class_fraction"))
  base, single = speed.get(BASE), speed.get("g1")
  speedup = {}
  if base and single:
    speedup["steps"] = single["steps"] / base["steps"]
    for b in batches:
      fast, slow = base["images_per_second"].get(str(b)), single["images_per_second"].get(str(b))
      if fast and slow:
        speedup[str(b)] = fast / slow
  lines = [markdown_table(header, rows), ""]
  if speedup:
    lines += ["Speed-up of g = 4 over g = 1: steps " + fmt(speedup["steps"], ".2f") + "x fewer; "
              + "; ".join(f"images/s x{fmt(v, '.2f')} at batch {b}"
                          for b, v in speedup.items() if b != "steps"), ""]
  lines += ["Quality of g = 4 against g = 1 (the paper: a small cost):", "",
            markdown_table(["figure", "difference (g4 - g1)", "seed spread", "beyond noise"],
                           [[k, fmt(v["difference"]), fmt(v["spread"]), quality_words(v["verdict"])]
                            for k, v in found.items()])]
  return "\n".join(lines), dict(quality=found, speedup=speedup)


def quality_words(text):
  """A verdict of g = 4 against g = 1 in words about g = 4's quality."""
  return {"reproduced": "g = 4 better beyond the noise",
          "not reproduced": "g = 4 worse beyond the noise",
          "inconclusive": "within the noise"}.get(text, text)


def group_size_verdict(found):
  """Reproduced when g = 4 samples faster than g = 1 at every measured batch size and its quality
  is not worse beyond the seed noise (a small cost, as the paper reports, is allowed)."""
  speedup = found["speedup"]
  rates = [v for k, v in speedup.items() if k != "steps"]
  if not rates:
    return "inconclusive (speed not measured)", None
  if min(rates) <= 1.0:
    return "not reproduced (g = 4 is not faster)", "images_per_second"
  key = next((k for k in ("fid", "classifier_fd") if found["quality"].get(k, {}).get(
      "difference") is not None), None)
  if key is None:
    return "reproduced for speed; quality not measured", "images_per_second"
  if found["quality"][key]["verdict"] == "not reproduced":
    # Worse beyond the noise (lower is better for both keys).
    return "reproduced for speed; quality worse beyond the seed noise", key
  return "reproduced", key


# ---------------------------------------------------------------------------------- guidance


def guidance_section(results):
  sweep = sorted(results.get("sweep") or [], key=lambda e: e["cfg_scale"])
  if not sweep:
    return "No guidance sweep found yet.", None
  rows = [[fmt(e["cfg_scale"], "g")] + [fmt(e["metrics"].get(k), spec)
                                         for k, _, _, spec in GENERATOR_METRICS] for e in sweep]
  key = "fid" if all(e["metrics"].get("fid") is not None for e in sweep) else "classifier_fd"
  scored = [e for e in sweep if e["metrics"].get(key) is not None]
  best = min(scored, key=lambda e: e["metrics"][key])["cfg_scale"] if scored else None
  first = sweep[0].get("sampling", {})
  text = [f"Arm {results.get('sweep_arm', BASE)}, {first.get('num_samples', '-')} samples per "
          f"scale, sampling seed {first.get('seed', '-')} (the arms' tables use another seed).", "",
          markdown_table(["CFG"] + [h for _, h, _, _ in GENERATOR_METRICS], rows), "",
          f"Lowest {key} on this seed: CFG {fmt(best, 'g')}."]
  return "\n".join(text), dict(best_cfg=best, by=key)


def plot_guidance(results, path):
  sweep = sorted(results.get("sweep") or [], key=lambda e: e["cfg_scale"])
  xs = [e["cfg_scale"] for e in sweep]
  panels = [dict(title=header, xlabel="CFG scale",
                 series={header: (xs, [e["metrics"].get(key) for e in sweep])})
            for key, header, _, _ in GENERATOR_METRICS]
  return plots.line_chart_grid(panels, path, columns=3)


# ------------------------------------------------------------------------------------ report


def compute_section(results):
  rows = []
  for name, arm in results["arms"].items():
    pipeline = arm.get("pipeline") or {}
    rows.append([name, arm["change"], fmt(pipeline.get("total_seconds"), ".0f"),
                 fmt(pipeline.get("sample_class_accuracy")), fmt(pipeline.get("classifier_fd"),
                                                                 ".2f")])
  return markdown_table(["arm", "what it changes", "pipeline seconds (the run that finished it)",
                         "in class (pipeline's samples)", "classifier FD (pipeline's samples)"],
                        rows)


def write_markdown(results, figures):
  """The whole report as markdown; also returns the verdicts. figures: {name: file name}."""
  ordering, ordering_found = ordering_section(results)
  correction, correction_found = correction_section(results)
  group, group_found = group_size_section(results)
  guidance, guidance_found = guidance_section(results)
  verdicts = dict(
      ordering=ordering_verdict(ordering_found), correction=correction_verdict(correction_found),
      group_size=group_size_verdict(group_found))
  rule = (f"Verdict rule: a difference counts when it exceeds {NOISE_FACTOR:g} x the difference "
          "between the two training seeds of the pipeline (detailflow, detailflow_seed1) on the "
          "same figure; in the paper's direction it is 'reproduced', against it 'not reproduced', "
          "otherwise 'inconclusive'. Two seeds give a rough noise estimate only.")
  parts = ["# DetailFlow study report", "", rule, "",
           "| claim | verdict | decided on |", "| --- | --- | --- |"]
  for claim, (text, key) in verdicts.items():
    parts.append(f"| {claim} | {text} | {key or '-'} |")
  parts += ["", "## Arms", "", compute_section(results), "",
            "## 1. Coarse-to-fine tokens (tokenizer ordering)", "", ordering, ""]
  for name in ("ordering_curves", "ordering_strip"):
    if name in figures:
      parts += [f"![{name}]({figures[name]})", ""]
  parts += ["## 2. Self-correction", "", correction, "",
            "## 3. Group-parallel decoding (g = 4 against g = 1)", "", group, "",
            "## Guidance sweep", "", guidance, ""]
  if "cfg_sweep" in figures:
    parts += [f"![cfg_sweep]({figures['cfg_sweep']})", ""]
  return "\n".join(parts), dict(verdicts=verdicts, guidance=guidance_found)
