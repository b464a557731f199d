"""Job eval_generator: class-conditional samples of a trained GPT + tokenizer, and their metrics.

1. Labels: `labels_per_class` > 0 gives exactly that many of every class (ImageNet: 50 x 1000),
   in class order; otherwise `num_samples` labels drawn uniformly with `seed`.
2. Sampling: group-parallel decoding (sampling.generate_codes) with the configured CFG scale,
   temperature, top-k / top-p; sample i uses the key fold_in(PRNGKey(seed), i), so the images
   do not depend on the batch size or the device count. Codes are decoded by the tokenizer at
   the decoder's side for num_tokens (resized to output_size when that is set) and saved as
   uint8 (floor(127.5 x + 128), as the official sampler) in an ADM-style samples.npz: arr_0
   [N, H, W, 3] uint8, arr_1 [N] int32 labels. It is streamed to disk batch by batch.
   eval.image_size S (an any-resolution tokenizer) samples the token count of an S x S image
   and decodes at S; the real-image reference is then center-cropped to S.
3. Metrics (ADM suite, eval.compute_inception): FID, sFID, precision, recall against a
   reference: an ADM .npz (its precomputed statistics are used as given), an image folder, or a
   split of the data section (Fashion-MNIST test by default). Reference statistics are cached.
4. Fashion-MNIST (data.source == "fashion_mnist", eval.compute_classifier_fd): classifier FD,
   the Frechet distance to the test split in the fixed judge's features (eval/classifier_fd.py),
   and the judge's in-class fraction of the samples, overall and per class. A domain metric
   beside Inception FID, cheap enough (seconds) to sweep with compute_inception=False.

Everything lands in WORKDIR/eval_generator/<run_name>/: samples.npz, sampling.json (the
settings that determine the samples; a re-run with the same ones reuses samples.npz) and
metrics.json (the numbers with every setting, reference and model step beside them). The
metrics are also TensorBoard scalars eval_generator/<name> at the GPT checkpoint's step in
WORKDIR/tensorboard/eval_generator/<run_name> (see write_tensorboard).
"""
import os
import pathlib
import re
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from detailflow_jax import api
from detailflow_jax import detail
from detailflow_jax import preemption
from detailflow_jax import sampling
from detailflow_jax.data import degrade
from detailflow_jax.eval import classifier_fd
from detailflow_jax.eval import inputs
from detailflow_jax.eval import judge_classifier
from detailflow_jax.eval import reference as reference_lib
from detailflow_jax.jobs import eval_common
from detailflow_jax.models import gpt as gpt_model
from detailflow_jax.models import tokenizer as tokenizer_model
from detailflow_jax.train import metrics_writer

OUTPUT_DIR = "eval_generator"


def sample_labels(eval_cfg, num_classes):
  """int32 labels of every sample (see the module docstring)."""
  if eval_cfg.labels_per_class < 0 or eval_cfg.num_samples < 0:
    raise ValueError(f"eval.labels_per_class={eval_cfg.labels_per_class} and eval.num_samples="
                     f"{eval_cfg.num_samples} must be >= 0")
  if eval_cfg.labels_per_class > 0:
    return np.repeat(np.arange(num_classes, dtype=np.int32), eval_cfg.labels_per_class)
  if eval_cfg.num_samples == 0:
    raise ValueError("set eval.num_samples > 0 or eval.labels_per_class > 0")
  rng = np.random.default_rng(eval_cfg.seed)
  return rng.integers(0, num_classes, eval_cfg.num_samples).astype(np.int32)


def sample_keys(seed, start, count):
  """PRNG keys of samples start .. start+count-1: fold_in(PRNGKey(seed), i)."""
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + count))


class NpzImageWriter:
  """Writes an ADM-style .npz (arr_0 uint8 [N, H, W, C], arr_1 labels) batch by batch.

  The array's header is written first with the final shape; batches stream into the zip member,
  so N images never sit in memory. The file appears (renamed from a temp file) only when complete.
  """

  def __init__(self, path, shape, labels):
    self.path = pathlib.Path(path)
    self.shape = tuple(int(s) for s in shape)
    self.labels = np.asarray(labels, np.int32)
    self.tmp = self.path.with_name(self.path.stem + ".tmp.npz")
    self.written = 0
    self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
    self.member = self.zip.open("arr_0.npy", "w", force_zip64=True)
    header = dict(descr=np.lib.format.dtype_to_descr(np.dtype(np.uint8)), fortran_order=False,
                  shape=self.shape)
    np.lib.format.write_array_header_2_0(self.member, header)

  def write(self, images):
    images = np.ascontiguousarray(images, np.uint8)
    if images.shape[1:] != self.shape[1:] or self.written + len(images) > self.shape[0]:
      raise ValueError(f"batch {images.shape} does not fit the .npz of shape {self.shape} "
                       f"({self.written} images written)")
    self.member.write(images.tobytes())
    self.written += len(images)

  def close(self):
    self.member.close()
    if self.written != self.shape[0]:
      self.zip.close()
      raise ValueError(f"{self.written} of {self.shape[0]} images written to {self.tmp}")
    with self.zip.open("arr_1.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array(f, self.labels)
    self.zip.close()
    os.replace(self.tmp, self.path)
    return self.path


def default_run_name(s):
  name = (f"cfg{s['cfg_scale']:g}{'-gradual' if s['gradual_cfg'] else ''}-temp{s['temperature']:g}"
          f"-topk{s['top_k']}-topp{s['top_p']:g}-tokens{s['num_tokens']}-size{s['output_size']}"
          f"-n{s['num_samples']}-seed{s['seed']}")
  return name if s["gpt_use_ema"] else name + "-noema"


def generate_samples(npz_path, gpt, tok, labels, s, batch_size, mesh):
  """Samples every label into npz_path; returns images per second."""
  (gpt_params, gpt_config), (tok_params, tok_config) = gpt, tok
  model = tokenizer_model.DetailFlowTokenizer(tok_config)
  decode = jax.jit(lambda p, codes: model.apply(
      {"params": p}, codes, s["num_tokens"], s["decoder_size"], method="decode_codes"))
  # Transposed weights: the same logits, a faster decode step on CPU (gpt.to_decoding_layout).
  gpt_params = eval_common.replicate(gpt_model.to_decoding_layout(gpt_params), mesh)
  tok_params = eval_common.replicate(tok_params, mesh)
  size = s["output_size"]
  writer = NpzImageWriter(npz_path, (len(labels), size, size, 3), labels)
  began = time.time()
  try:
    for start in range(0, len(labels), batch_size):
      count = min(batch_size, len(labels) - start)
      # The last batch is padded to the static batch size; padded rows are dropped.
      batch_labels = np.zeros(batch_size, np.int32)
      batch_labels[:count] = labels[start:start + count]
      codes = sampling.generate_codes(
          gpt_params, gpt_config, eval_common.shard_rows(batch_labels, mesh),
          rng=eval_common.shard_rows(sample_keys(s["seed"], start, batch_size), mesh),
          cfg_scale=s["cfg_scale"], temperature=s["temperature"], top_k=s["top_k"],
          top_p=s["top_p"], gradual_cfg=s["gradual_cfg"], num_tokens=s["num_tokens"])
      images = np.asarray(decode(tok_params, codes))[:count]
      if size != images.shape[1]:
        images = degrade.resize_images(images, size)
      writer.write(inputs.to_uint8(images))
      done = start + count
      rate = done / (time.time() - began)
      print(f"eval_generator: {done}/{len(labels)} samples, {rate:.2f} images/s", flush=True)
      if done < len(labels) and preemption.reached("eval_generator_batch"):
        raise preemption.Preempted(
            f"SIGTERM: sampling stopped after {done} of {len(labels)} samples ({npz_path} is "
            "written only when complete); run the same command to sample again.")
  except BaseException:
    writer.member.close()
    writer.zip.close()
    raise
  writer.close()
  return len(labels) / (time.time() - began)


def _reference_name(e, config, image_size):
  if e.reference:
    base = os.path.basename(os.path.normpath(e.reference))
  else:
    base = f"{config.data.source}-{e.reference_split}-{image_size}px"
  count = e.reference_num_images or "all"
  return re.sub(r"[^A-Za-z0-9._-]+", "_", f"reference-{base}-{count}")


def reference_statistics(e, config, extractor, image_size, cache_dir):
  """ReferenceStatistics of the configured reference (cached), and a description of it."""
  cap = e.reference_num_images or None
  cache = pathlib.Path(e.reference_cache or cache_dir / f"{_reference_name(e, config, image_size)}.npz")
  described = dict(reference=e.reference or f"data.source={config.data.source} split="
                   f"{e.reference_split}", center_crop=None if e.reference.endswith(".npz")
                   else image_size,
                   max_images=cap, cache=str(cache.absolute()))
  if cache.is_file():
    logging.info("reference statistics from %s", cache)
    return reference_lib.load_reference(cache), described
  bs = extractor.batch_size
  if e.reference.endswith(".npz"):
    if not os.path.isfile(e.reference):
      raise ValueError(f"eval.reference={e.reference!r} does not exist")
    batches = inputs.iterate_npz_images(e.reference, bs, max_images=cap)
  elif e.reference:
    batches = inputs.iterate_image_folder(e.reference, bs, image_size=image_size)
  else:
    count = eval_common.source_length(config.data, e.reference_split)
    indices = range(count if cap is None else min(cap, count))
    batches = eval_common.source_batches(config.data, e.reference_split, image_size, bs, indices)
  reference = reference_lib.reference_from_features(extractor(batches, cap))
  if e.reference.endswith(".npz") and {"mu", "sigma"} <= set(inputs.npz_array_keys(e.reference)):
    # An ADM reference batch: its precomputed statistics are the reference, as in ADM.
    given = reference_lib.load_reference(e.reference)
    reference = reference._replace(pool=given.pool, spatial=given.spatial or reference.spatial)
    described["statistics"] = "precomputed in the reference .npz"
  reference_lib.save_reference(cache, reference)
  return reference, described


def evaluate_generator(config, workdir):
  """The eval_generator job; returns the payload written to metrics.json."""
  eval_common.check_single_process("eval_generator")
  e = config.eval
  gpt_workdir = eval_common.resolve_workdir(e.gpt_workdir, None, "eval.gpt_workdir")
  gpt_config, gpt_params, gpt_step, gpt_run_config = eval_common.load_gpt(
      gpt_workdir, e.gpt_step, e.gpt_use_ema)
  trained_with = gpt_run_config.get("extract", {}).get("tokenizer_workdir", "")
  tok_workdir = eval_common.resolve_workdir(e.tokenizer_workdir, trained_with,
                                            "eval.tokenizer_workdir")
  tok_config, tok_params, tok_step = eval_common.load_tokenizer(
      tok_workdir, e.tokenizer_step, e.tokenizer_use_ema)
  api.check_pairing(tok_config, gpt_config)
  mesh = eval_common.build_mesh(config.mesh, e.batch_size, "eval.batch_size")
  # eval.image_size S (an any-resolution tokenizer; 0: its own size): the codes of an S x S
  # image (api.token_count_for_size, unless eval.num_tokens), decoded at S.
  image_size = int(e.get("image_size", 0) or 0)
  if image_size:
    num_tokens = e.num_tokens or api.token_count_for_size(tok_config, image_size)
    decoder_size = image_size
  else:
    num_tokens = e.num_tokens or gpt_config.block_size
    decoder_size = detail.resolution_schedule(tok_config).decoder_size(num_tokens)
  labels = sample_labels(e, gpt_config.num_classes)
  s = dict(
      gpt_workdir=gpt_workdir, gpt_step=gpt_step, gpt_use_ema=bool(e.gpt_use_ema),
      tokenizer_workdir=tok_workdir, tokenizer_step=tok_step,
      tokenizer_use_ema=bool(e.tokenizer_use_ema), num_samples=len(labels),
      labels_per_class=int(e.labels_per_class), seed=int(e.seed), cfg_scale=float(e.cfg_scale),
      gradual_cfg=bool(e.gradual_cfg), temperature=float(e.temperature), top_k=int(e.top_k),
      top_p=float(e.top_p), num_tokens=int(num_tokens), decoder_size=int(decoder_size),
      output_size=int(e.output_size or decoder_size),
      uint8_conversion="floor(127.5 x + 128) clipped to [0, 255]",
      **({"image_size": image_size} if image_size else {}))
  run_dir = pathlib.Path(workdir) / OUTPUT_DIR / (e.run_name or default_run_name(s))
  run_dir.mkdir(parents=True, exist_ok=True)
  npz_path, sampling_json = run_dir / "samples.npz", run_dir / "sampling.json"

  timing = {}
  previous = eval_common.read_json(sampling_json) if sampling_json.is_file() else None
  if e.reuse_samples and npz_path.is_file() and previous == eval_common.normalised_json(s):
    print(f"eval_generator: reusing {npz_path} (same sampling settings)", flush=True)
  else:
    if npz_path.is_file():
      npz_path.unlink()
    began = time.time()
    timing["sampling_images_per_second"] = generate_samples(
        npz_path, (gpt_params, gpt_config), (tok_params, tok_config), labels, s, e.batch_size,
        mesh)
    timing["sampling_seconds"] = time.time() - began
    eval_common.write_json(sampling_json, s)

  metrics, reference_info, features_info, classifier_info = None, None, None, None
  if e.compute_metrics:
    metrics = dict(num_images=len(labels))
    if e.compute_inception:
      began = time.time()
      eval_common.build_mesh(config.mesh, e.inception_batch_size, "eval.inception_batch_size")
      extractor = eval_common.make_feature_extractor(e.inception_weights, e.inception_batch_size,
                                                     mesh)
      reference, reference_info = reference_statistics(
          e, config, extractor, image_size or tok_config.image_size,
          pathlib.Path(workdir) / OUTPUT_DIR)
      features = extractor(inputs.iterate_npz_images(str(npz_path), extractor.batch_size))
      metrics.update(reference_lib.metrics_from_features(features, reference,
                                                         fid_method=e.fid_method))
      metrics["reference_num_images"] = reference.num_images
      features_info = extractor.describe()
      timing["metrics_seconds"] = time.time() - began
    if e.compute_classifier_fd:
      began = time.time()
      metrics_cls, classifier_info = classifier_metrics(e, config, npz_path, labels)
      metrics.update(metrics_cls)
      timing["classifier_seconds"] = time.time() - began

  payload = dict(metrics=metrics, sampling=s, reference=reference_info,
                 samples_npz=str(npz_path.absolute()), timing=timing,
                 settings=dict(eval_common.run_record(config), features=features_info,
                               classifier=classifier_info, gpt=gpt_config.to_dict(),
                               tokenizer=tok_config.to_dict()))
  path = eval_common.write_json(run_dir / "metrics.json", payload)
  if metrics:
    write_tensorboard(workdir, run_dir.name, gpt_step, metrics)
  print(f"eval_generator: {metrics}\nwrote {path}", flush=True)
  return payload


def tensorboard_scalars(metrics):
  """{eval_generator/<name>: number}: FID, sFID, precision, recall, classifier FD, in-class
  fraction ...; a dict (per-class accuracy) becomes one tag per key; None and counts left out."""
  scalars = {}
  for key, value in metrics.items():
    if key.endswith("num_images") or value is None:
      continue
    if isinstance(value, dict):
      scalars.update({f"eval_generator/{key}/{k}": v for k, v in value.items() if v is not None})
    else:
      scalars[f"eval_generator/{key}"] = value
  return scalars


def write_tensorboard(workdir, run_name, gpt_step, metrics):
  """The metrics at the GPT's checkpoint step, so evaluations of successive checkpoints draw a
  training curve; each sampling setting (run_name: CFG, temperature ...) is its own run."""
  metrics_writer.write_scalars(workdir, gpt_step, tensorboard_scalars(metrics),
                               run=f"{OUTPUT_DIR}/{run_name}")


def classifier_metrics(e, config, npz_path, labels):
  """Classifier FD and the judge's class scores of the samples in npz_path (the streamed file,
  read back in batches), and a description of the judge; ({}, None) off Fashion-MNIST."""
  if config.data.source != "fashion_mnist":
    print(f"eval_generator: no classifier FD (data.source={config.data.source!r}; the fixed "
          f"judge is a Fashion-MNIST classifier)", flush=True)
    return {}, None
  judge = classifier_fd.fixed_judge(config.data.fashion_mnist_dir, e.judge_epochs, e.judge_seed,
                                    e.judge_cache_dir)
  scores = classifier_fd.score_samples(
      judge, inputs.iterate_npz_images(str(npz_path), judge_classifier.BATCH_SIZE), labels,
      method=e.fid_method)
  metrics = {k: v for k, v in scores.items() if k != "num_images"}
  metrics["classifier_test_accuracy"] = judge.test_accuracy
  metrics["classifier_fd_reference_num_images"] = judge.num_test_images
  per_class = " ".join(f"{c}:{a:.2f}" for c, a in scores["classifier_per_class_accuracy"].items())
  print(f"eval_generator: classifier FD {scores['classifier_fd']:.4f} against the "
        f"{judge.num_test_images} test images; in class {scores['classifier_in_class_fraction']:.4f}"
        f" (per class {per_class}; judge test accuracy {judge.test_accuracy:.4f})", flush=True)
  return metrics, judge.describe()
