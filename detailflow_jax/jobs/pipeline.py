"""The `pipeline` job: the embedded default end to end, each stage in its own sub-workdir.

tokenizer/ (train) -> decoder/ (the decoder fine-tuned on the frozen codes, when
decoder_finetune.num_steps > 0) -> tokenizer_eval/ (PSNR per prefix) -> codes/ (extract) ->
ar/ (train) -> samples/ (grid, strips, npz) -> judge/ (the fixed judge's accuracy and
classifier FD of the samples; the judge is trained once and cached, eval/classifier_fd.py).
Every stage resumes or is skipped when its output is complete, so rerunning the command after an
interruption continues where it stopped: the trainers resume from their checkpoints, extraction
from its shards, the tokenizer check and the samples are kept when they were made from the same
checkpoints with the same settings. SIGTERM stops the stage in progress at its next safe point
(preemption.py), what it has done saved, and no later stage starts; the process exits 0 and the
same command resumes, ending with the same params, codes and samples as an uninterrupted run.
The stages run in this process, not through main.py, so the pipeline writes each stage's config
as the `config` text of its tensorboard/ folder.
"""
import copy
import json
import pathlib
import time

from detailflow_jax import preemption
from detailflow_jax import workdir_io
from detailflow_jax.train import metrics_writer


def _stage(name, fn):
  start = time.perf_counter()
  print(f"==> {name}", flush=True)
  try:
    result = fn()
  except preemption.Preempted as stopped:
    raise preemption.Preempted(f"{stopped}\nThe pipeline stopped in stage '{name}'; no later "
                               "stage started.") from None
  # A trainer stopped by SIGTERM saves its step and returns normally: check before going on.
  if preemption.reached("stage_end"):
    raise preemption.Preempted(
        f"SIGTERM: the pipeline stopped after stage '{name}' (its work is saved); no later stage "
        "started. Run the same command to resume.")
  print(f"<== {name}: {time.perf_counter() - start:.0f} s", flush=True)
  return result


def tokenizer_eval_is_current(out_dir, tokenizer_workdir, eval_cfg):
  """True when out_dir/metrics.json (written last by the evaluation) is of the tokenizer's
  latest checkpoint with these tokenizer_eval settings."""
  path = pathlib.Path(out_dir) / "metrics.json"
  if not path.is_file():
    return False
  settings = json.loads(path.read_text()).get("settings", {})
  evaluated = settings.get("config", {}).get("eval", {})
  wanted = json.loads(json.dumps(eval_cfg.to_dict()))
  return (settings.get("checkpoint_step") == workdir_io.resolve_step(tokenizer_workdir)
          and all(evaluated.get(k) == v for k, v in wanted.items()))


def decoder_stage_config(config, workdir):
  """The decoder fine-tune's config: the tokenizer run's, continued from WORKDIR/tokenizer with
  only the decoder trained (train/finetune.py), for decoder_finetune.num_steps at its own
  learning rate; None when num_steps is 0."""
  settings = config.get("decoder_finetune")
  if not settings or not settings.num_steps:
    return None
  decoder = copy.deepcopy(config.tokenizer_run)
  decoder.finetune.from_workdir = str(pathlib.Path(workdir) / "tokenizer")
  decoder.finetune.decoder_only = True
  decoder.code_reset.every = 0          # the codebook is frozen
  decoder.train.num_steps = settings.num_steps
  decoder.optim.learning_rate = settings.learning_rate
  decoder.optim.min_learning_rate = min(decoder.optim.min_learning_rate, settings.learning_rate)
  return decoder


def stage_configs(config, workdir):
  """The per-stage configs with the workdirs wired together. Codes come from tokenizer/ (a
  decoder fine-tune keeps them); the tokenizer check and the samples decode with the final
  tokenizer, decoder/ when the fine-tune is on."""
  w = pathlib.Path(workdir)
  tokenizer = copy.deepcopy(config.tokenizer_run)
  decoder = decoder_stage_config(config, w)
  ar = copy.deepcopy(config.ar_run)
  ar.extract.tokenizer_workdir = str(w / "tokenizer")
  ar.data.codes_dir = str(w / "codes")
  extract = copy.deepcopy(ar)
  extract.job = "extract_codes"
  sample = copy.deepcopy(config)
  sample.sample.tokenizer_workdir = str(final_tokenizer_dir(config, w))
  sample.sample.gpt_workdir = str(w / "ar")
  stages = dict(tokenizer=tokenizer, extract=extract, ar=ar, sample=sample)
  if decoder is not None:
    stages["decoder"] = decoder
  return stages


def final_tokenizer_dir(config, workdir):
  """The workdir of the tokenizer the pipeline decodes with."""
  name = "decoder" if decoder_stage_config(config, workdir) is not None else "tokenizer"
  return pathlib.Path(workdir) / name


# stage_configs key -> the stage's sub-workdir.
STAGE_DIRS = dict(tokenizer="tokenizer", decoder="decoder", extract="codes", ar="ar",
                  sample="samples")


def write_stage_configs(config, cfg, workdir):
  """Each stage's config as text in its WORKDIR/<stage>/tensorboard (main.py writes the
  pipeline's own in WORKDIR/tensorboard)."""
  w = pathlib.Path(workdir)
  for key, folder in STAGE_DIRS.items():
    if key in cfg:
      metrics_writer.write_config(w / folder, cfg[key])
  if config.tokenizer_eval.num_images:
    metrics_writer.write_config(w / "tokenizer_eval", config.tokenizer_eval)


def run_pipeline(config, workdir):
  # Imported here: each stage pulls in its own models.
  from detailflow_jax.jobs import eval_tokenizer  # pylint: disable=g-import-not-at-top
  from detailflow_jax.jobs import extract_codes  # pylint: disable=g-import-not-at-top
  from detailflow_jax.jobs import judge  # pylint: disable=g-import-not-at-top
  from detailflow_jax.jobs import sample  # pylint: disable=g-import-not-at-top
  from detailflow_jax.train import ar_trainer  # pylint: disable=g-import-not-at-top
  from detailflow_jax.train import tokenizer_trainer  # pylint: disable=g-import-not-at-top

  w = pathlib.Path(workdir)
  w.mkdir(parents=True, exist_ok=True)
  workdir_io.save_workdir_config(config, w)
  cfg = stage_configs(config, w)
  write_stage_configs(config, cfg, w)
  start = time.perf_counter()
  with preemption.sigterm_caught():  # for callers that bypass main.py
    _stage("train tokenizer", lambda: tokenizer_trainer.train_and_evaluate(
        cfg["tokenizer"], w / "tokenizer"))
    if "decoder" in cfg:
      _stage("train decoder", lambda: tokenizer_trainer.train_and_evaluate(
          cfg["decoder"], w / "decoder", name="decoder"))
    final = final_tokenizer_dir(config, w)
    if config.tokenizer_eval.num_images:
      eval_cfg = copy.deepcopy(config.tokenizer_eval)
      if tokenizer_eval_is_current(w / "tokenizer_eval", final, eval_cfg):
        print(f"==> evaluate tokenizer: {w / 'tokenizer_eval'}/metrics.json is of the "
              "tokenizer's latest checkpoint with these settings; kept", flush=True)
      else:
        _stage("evaluate tokenizer", lambda: eval_tokenizer.evaluate_prefixes(
            str(final), str(w / "tokenizer_eval"), eval_cfg, cfg["tokenizer"].data))
    extracted = _stage("extract codes",
                       lambda: extract_codes.extract_codes(cfg["extract"], w / "codes"))
    if extracted.get("replaced_stale_codes") and workdir_io.checkpoint_steps(w / "ar"):
      print(f"warning: {w / 'ar'} holds a GPT trained on the codes just replaced; it resumes from "
            f"its checkpoint. Delete that folder to train the GPT on the new codes.", flush=True)
    _stage("train GPT", lambda: ar_trainer.train_and_evaluate(cfg["ar"], w / "ar"))
    images, labels = _stage("sample", lambda: sample.sample_job(cfg["sample"], w / "samples"))
    if config.tokenizer_run.data.source == "fashion_mnist":
      report = _stage("judge samples", lambda: judge.judge_samples(
          w / "judge", images, labels, config.tokenizer_run.data.fashion_mnist_dir,
          epochs=config.judge.epochs))
    else:  # the fixed judge is a Fashion-MNIST classifier
      print(f"==> judge samples: skipped (no judge for data.source="
            f"{config.tokenizer_run.data.source!r})", flush=True)
      report = {}
  total = time.perf_counter() - start
  summary = dict(report, total_seconds=total)
  workdir_io.write_text_atomically(w / "summary.json", json.dumps(summary, indent=2))
  judged = (f"samples in their class {report['sample_class_accuracy']:.3f} (judge test "
            f"accuracy {report['judge_test_accuracy']:.3f}), classifier FD "
            f"{report['classifier_fd']:.3f}; " if report else "")
  print(f"done in {total / 60:.1f} min: {judged}outputs in {w}", flush=True)
  return summary
