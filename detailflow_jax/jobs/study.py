"""Job `study`: the reproduction study of docs/reproduction.md (configs/study.py).

1. Arms (config.study.arms): each is the pipeline job with one switch flipped
   (jobs/study_arms.py), run in WORKDIR/<arm> with a progress line per arm. An arm whose
   summary.json was written by a pipeline with the same config is complete and skipped; any other
   resumes stage by stage (jobs/pipeline.py), so the same command continues after an interruption.
2. Report (config.study.report), from every arm found in WORKDIR:
   - the tokenizer arms' per-n figures (their tokenizer_eval/metrics.json) as one figure of curves
     and tables, and a strip of the same test images decoded from n tokens under each arm;
   - each generator arm sampled by eval_generator (study.generator_per_class per class, seed
     study.generator_seed, the pipeline's CFG and sampling settings), into
     WORKDIR/<arm>/eval_generator/<run name>; kept when already done with the same checkpoints;
   - a guidance sweep (study.sweep_cfg_scales) of study.sweep_arm on sampling seed
     study.sweep_seed;
   - sampling steps (counted: one per model call of the stepwise sampler) and images/s of the
     sampler of the group-size arms, timed in this process, arms alternating, median of rounds;
   - report.md (a table per claim, verdicts), report.json and the PNGs in WORKDIR/report, also
     copied to study.copy_figures_to when set (e.g. docs/images/study).
"""
import copy
import json
import pathlib
import shutil
import statistics
import time

import numpy as np

from detailflow_jax import workdir_io
from detailflow_jax.eval import study_report
from detailflow_jax.jobs import study_arms

REPORT_DIR = "report"
ARM_FILE = "study_arm.json"
FIGURES = dict(ordering_curves="ordering_curves.png", ordering_strip="ordering_strip.png",
               cfg_sweep="cfg_sweep.png")


def data_adjusted(config):
  """The study config, turned onto config.data.folder when that is set."""
  folder = config.data.folder
  if not folder:
    return config
  from detailflow_jax.data import image_folder  # pylint: disable=g-import-not-at-top
  classes = image_folder.ImageFolderSource(folder, config.tokenizer_run.data.train_split).classes
  print(f"study: image folder {folder}: {len(classes)} classes", flush=True)
  return study_arms.folder_run(config, folder, len(classes))


def arm_is_complete(arm_dir, arm_cfg):
  """True when the arm's pipeline finished (summary.json) with this very config."""
  summary, saved = arm_dir / "summary.json", arm_dir / workdir_io.CONFIG_FILE
  if not (summary.is_file() and saved.is_file()):
    return False
  return json.loads(saved.read_text()) == json.loads(arm_cfg.to_json_best_effort(sort_keys=True))


def describe_switches(changed):
  return "; ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in changed.items()) \
      or "no switch"


def run_arms(config, workdir):
  from detailflow_jax.jobs import pipeline  # pylint: disable=g-import-not-at-top
  names = study_arms.parse_names(config.study.arms)
  for i, name in enumerate(names, 1):
    arm_cfg, changed = study_arms.arm_config(config, name)
    arm_dir = pathlib.Path(workdir) / name
    head = f"study: arm {i}/{len(names)} {name}"
    if arm_is_complete(arm_dir, arm_cfg):
      print(f"{head}: complete ({arm_dir / 'summary.json'}), skipped", flush=True)
      continue
    print(f"{head}: {study_arms.get_arm(name).change} [{describe_switches(changed)}] -> "
          f"{arm_dir}", flush=True)
    workdir_io.write_text_atomically(arm_dir / ARM_FILE, json.dumps(dict(
        arm=name, change=study_arms.get_arm(name).change,
        switches={k: list(v) for k, v in changed.items()}), indent=2))
    began = time.perf_counter()
    # A stop (SIGTERM, a crash) leaves the arm to resume: the line above names it.
    summary = pipeline.run_pipeline(arm_cfg, arm_dir)
    print(f"{head}: done in {(time.perf_counter() - began) / 60:.1f} min "
          f"(in class {summary.get('sample_class_accuracy', float('nan')):.3f})", flush=True)


# ------------------------------------------------------------------------ generator evaluation


def _read_json(path):
  path = pathlib.Path(path)
  return json.loads(path.read_text()) if path.is_file() else None


def generator_eval_config(study, arm_cfg, arm_dir, cfg_scale, seed, per_class, run_name,
                          reference_cache):
  """eval_generator's config for one arm: its models, the pipeline's sampling settings."""
  from detailflow_jax.config import eval_jobs  # pylint: disable=g-import-not-at-top
  c = eval_jobs.eval_generator_config()
  c.data = copy.deepcopy(arm_cfg.tokenizer_run.data)
  e = c.eval
  e.gpt_workdir, e.tokenizer_workdir = str(arm_dir / "ar"), str(arm_dir / "tokenizer")
  e.labels_per_class, e.seed, e.cfg_scale = int(per_class), int(seed), float(cfg_scale)
  sample = arm_cfg.sample
  e.temperature, e.top_k, e.top_p = sample.temperature, sample.top_k, sample.top_p
  e.gradual_cfg = sample.gradual_cfg
  e.batch_size = sample.batch_size
  e.compute_inception = bool(study.compute_inception)
  e.inception_weights = study.inception_weights
  e.judge_epochs = arm_cfg.judge.epochs      # the pipeline judge's recipe: its cached judge
  e.reference_cache = str(reference_cache)
  e.run_name = run_name
  return c


def evaluate_generator(config, arm_cfg, arm_dir, cfg_scale, seed, per_class, reference_cache):
  """{metrics, sampling, timing} of eval_generator for one arm and setting; reuses a finished
  evaluation of the same checkpoints and settings (with Inception figures when asked)."""
  from detailflow_jax.jobs import eval_generator  # pylint: disable=g-import-not-at-top
  run_name = f"study-cfg{cfg_scale:g}-seed{seed}-per_class{per_class}"
  c = generator_eval_config(config.study, arm_cfg, arm_dir, cfg_scale, seed, per_class, run_name,
                            reference_cache)
  done = _read_json(arm_dir / eval_generator.OUTPUT_DIR / run_name / "metrics.json")
  if done and done.get("metrics"):
    s = done["sampling"]
    if (s["gpt_step"] == workdir_io.resolve_step(arm_dir / "ar")
        and s["tokenizer_step"] == workdir_io.resolve_step(arm_dir / "tokenizer")
        and (not c.eval.compute_inception or "fid" in done["metrics"])):
      print(f"study: {arm_dir.name} {run_name}: evaluated before, kept", flush=True)
      return dict(metrics=done["metrics"], sampling=s, timing=done.get("timing", {}))
  print(f"study: {arm_dir.name} {run_name}: sampling {per_class} per class", flush=True)
  payload = eval_generator.evaluate_generator(c, str(arm_dir))
  return dict(metrics=payload["metrics"], sampling=payload["sampling"], timing=payload["timing"])


# ---------------------------------------------------------------------------- sampler speed


def sampler_settings(sample_cfg):
  return dict(cfg_scale=float(sample_cfg.cfg_scale), temperature=float(sample_cfg.temperature),
              top_k=int(sample_cfg.top_k), top_p=float(sample_cfg.top_p),
              gradual_cfg=bool(sample_cfg.gradual_cfg))


def count_steps(params, settings):
  """Model calls of one decode: the stepwise sampler returns after each one."""
  import jax  # pylint: disable=g-import-not-at-top
  from detailflow_jax import sampling  # pylint: disable=g-import-not-at-top
  stages = sampling.generate_codes_stepwise(params.gpt, params.gpt_config, np.zeros(1, np.int32),
                                            rng=jax.random.PRNGKey(0), **settings)
  return sum(1 for _ in stages)


def measure_speed(arm_dirs, settings, batch_sizes, repeats):
  """{arm: {group_size, num_tokens, steps, images_per_second: {batch: images/s}, seconds}} of
  api.sample (codes and decode), all arms in this process: each program is compiled and run once
  first, then `repeats` rounds time every (batch size, arm) in turn; the median is reported."""
  import jax  # pylint: disable=g-import-not-at-top
  from detailflow_jax import api  # pylint: disable=g-import-not-at-top
  loaded = {name: api.load_sampler_params(d / "tokenizer", d / "ar")
            for name, d in arm_dirs.items()}

  def run(params, batch):
    labels = np.arange(batch, dtype=np.int32) % params.gpt_config.num_classes
    jax.block_until_ready(api.sample(params, labels, rng=jax.random.PRNGKey(batch), **settings))

  for params in loaded.values():
    for batch in batch_sizes:
      run(params, batch)
  seconds = {(name, b): [] for name in loaded for b in batch_sizes}
  for _ in range(repeats):
    for batch in batch_sizes:
      for name, params in loaded.items():
        began = time.perf_counter()
        run(params, batch)
        seconds[(name, batch)].append(time.perf_counter() - began)
  out = {}
  for name, params in loaded.items():
    c = params.gpt_config
    out[name] = dict(
        group_size=c.group_size, num_tokens=c.block_size, steps=count_steps(params, settings),
        images_per_second={str(b): b / statistics.median(seconds[(name, b)]) for b in batch_sizes},
        seconds={str(b): seconds[(name, b)] for b in batch_sizes})
    print(f"study: sampler {name}: g={c.group_size}, {out[name]['steps']} steps, images/s "
          + ", ".join(f"{v:.2f} at batch {b}" for b, v in out[name]["images_per_second"].items()),
          flush=True)
  return out


# ------------------------------------------------------------------------------------ strip


def strip_columns(token_list, max_columns):
  counts = list(token_list)
  if len(counts) <= max_columns:
    return counts
  keep = np.unique(np.linspace(0, len(counts) - 1, max_columns).round().astype(int))
  return [counts[i] for i in keep]


def ordering_strip(study, arms, path):
  """The same test images (evenly spaced over the eval split) decoded from their first n tokens
  under each tokenizer arm: a row per (image, arm), a column per n, the image itself last."""
  from detailflow_jax import api  # pylint: disable=g-import-not-at-top
  from detailflow_jax import detail  # pylint: disable=g-import-not-at-top
  from detailflow_jax import images as image_io  # pylint: disable=g-import-not-at-top
  from detailflow_jax import labelled_grid  # pylint: disable=g-import-not-at-top
  from detailflow_jax.jobs import eval_common  # pylint: disable=g-import-not-at-top
  tokenizers = {name: api.load_tokenizer(d / "tokenizer") for name, (_, d) in arms.items()}
  first_cfg = next(iter(arms.values()))[0]
  data = first_cfg.tokenizer_run.data
  config = next(iter(tokenizers.values())).config
  size = config.image_size
  split = data.eval_split
  count = eval_common.source_length(data, split)
  indices = np.unique(np.linspace(0, count - 1, study.strip_images).round().astype(int))
  real = np.stack(list(eval_common.source_images(data, split, size, indices)))
  schedule = detail.resolution_schedule(config)
  columns = strip_columns(schedule.token_list, study.strip_max_columns)
  decoded = {}
  for name, tok in tokenizers.items():
    codes = api.encode(tok, real.astype(np.float32) / 127.5 - 1.0)
    decoded[name] = {n: image_io.to_uint8(np.clip(np.asarray(api.decode(tok, codes, n)), -1, 1))
                     for n in columns}
  rows, labels = [], []
  for i, index in enumerate(indices):
    for name in tokenizers:
      rows.append([decoded[name][n][i] for n in columns] + [real[i]])
      labels.append(f"#{index} {name}")
  col_labels = [f"n={n}\nR(n)={schedule.content_resolution(n)}" for n in columns] + ["image"]
  strip = labelled_grid.labelled_strip(rows, size, labels, col_labels,
                                       scale=max(1, 96 // size))
  image_io.save_png(strip, path)
  return dict(indices=[int(i) for i in indices], token_counts=columns, arms=list(tokenizers))


# ----------------------------------------------------------------------------------- report


def _tokenizer_eval(arm_dir):
  payload = _read_json(arm_dir / "tokenizer_eval" / "metrics.json")
  return dict(per_n=payload["per_n"], summary=payload["summary"]) if payload else None


def write_report(config, workdir):
  """Evaluations the report needs, then WORKDIR/report: report.md, report.json, PNGs."""
  w = pathlib.Path(workdir)
  study = config.study
  out = w / REPORT_DIR
  out.mkdir(parents=True, exist_ok=True)
  reference_cache = out / "inception_reference.npz"
  names = study_arms.parse_names(study.report_arms)
  results = dict(arms={}, sweep=[], speed={}, sweep_arm=study.sweep_arm, strip=None)
  configs = {}
  for name in names:
    arm = study_arms.get_arm(name)
    arm_cfg, changed = study_arms.arm_config(config, name)
    arm_dir = w / name
    configs[name] = (arm_cfg, arm_dir)
    entry = dict(change=arm.change, switches={k: list(v) for k, v in changed.items()},
                 tokenizer_eval=_tokenizer_eval(arm_dir),
                 pipeline=_read_json(arm_dir / "summary.json"), generator=None)
    results["arms"][name] = entry
    if entry["pipeline"] is None:
      print(f"study report: arm {name}: not run yet ({arm_dir / 'summary.json'} missing)",
            flush=True)
      continue
    if set(arm.claims) & {study_arms.CORRECTION, study_arms.GROUP_SIZE, study_arms.NOISE}:
      entry["generator"] = evaluate_generator(
          config, arm_cfg, arm_dir, arm_cfg.sample.cfg_scale, study.generator_seed,
          study.generator_per_class, reference_cache)
  finished = [n for n in names if results["arms"][n]["pipeline"] is not None]
  if study.sweep_arm in finished:
    arm_cfg, arm_dir = configs[study.sweep_arm]
    for scale in study_arms.parse_numbers(study.sweep_cfg_scales):
      done = evaluate_generator(config, arm_cfg, arm_dir, scale, study.sweep_seed,
                                study.sweep_per_class, reference_cache)
      results["sweep"].append(dict(cfg_scale=scale, **done))
  group_arms = {n: configs[n][1] for n in study_report.GROUP_ARMS if n in finished}
  if group_arms and study.speed_repeats > 0:
    settings = sampler_settings(configs[next(iter(group_arms))][0].sample)
    results["speed"] = measure_speed(group_arms, settings,
                                     study_arms.parse_numbers(study.speed_batch_sizes, int),
                                     int(study.speed_repeats))
  figures = {}
  # Tokenizers whose stage is complete (their evaluation is written after training).
  strip_arms = {n: configs[n] for n in study_report.ORDERING_ARMS
                if n in configs and results["arms"][n]["tokenizer_eval"] is not None}
  if strip_arms and study.strip_images > 0:
    results["strip"] = ordering_strip(study, strip_arms, out / FIGURES["ordering_strip"])
    figures["ordering_strip"] = FIGURES["ordering_strip"]
  if any(study_report.per_n(results, n) for n in study_report.ORDERING_ARMS):
    study_report.plot_ordering(results, out / FIGURES["ordering_curves"])
    figures["ordering_curves"] = FIGURES["ordering_curves"]
  if results["sweep"]:
    study_report.plot_guidance(results, out / FIGURES["cfg_sweep"])
    figures["cfg_sweep"] = FIGURES["cfg_sweep"]
  text, decided = study_report.write_markdown(results, figures)
  workdir_io.write_text_atomically(out / "report.md", text + "\n")
  results.update(decided)
  workdir_io.write_text_atomically(out / "report.json",
                                   json.dumps(results, indent=2, default=str) + "\n")
  if study.copy_figures_to:
    dest = pathlib.Path(study.copy_figures_to)
    dest.mkdir(parents=True, exist_ok=True)
    for name in figures.values():
      shutil.copy(out / name, dest / name)
    print(f"study report: copied {', '.join(figures.values())} to {dest}", flush=True)
  for claim, (verdict, key) in decided["verdicts"].items():
    print(f"study report: {claim}: {verdict} (on {key or '-'})", flush=True)
  print(f"study report: {out / 'report.md'}", flush=True)
  return results


def run_study(config, workdir):
  """The `study` job (see the module docstring)."""
  config = data_adjusted(config)
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  run_arms(config, workdir)
  if config.study.report:
    return write_report(config, workdir)
  return None
