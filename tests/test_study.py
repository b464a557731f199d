"""The study job (jobs/study.py, jobs/study_arms.py, configs/study.py): arms as one switch each,
the g = 1 sampler's step count, the folder switch, and the report built from fake result files."""
import json
import pathlib
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from detailflow_jax import sampling
from detailflow_jax.config import files
from detailflow_jax.jobs import study
from detailflow_jax.jobs import study_arms
from detailflow_jax.models import gpt as gpt_model

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "study.py")


def load(arg):
  return files.load_config_file(f"{CONFIG}:{arg}")


def flat(config):
  out = {}
  for key in files.flatten_keys(config):
    node = config
    for part in key.split("."):
      node = node[part]
    out[key] = node
  return out


def test_config_args():
  assert load("all,smoke").study.arms == ",".join(study_arms.ARM_NAMES)
  single = load("g1,long")
  assert (single.study.arms, single.study.report) == ("g1", False)
  assert single.tokenizer_run.train.num_steps == 12_000    # configs/default.py:long
  assert load("report").study.arms == "" and load("report").study.report
  assert files.load_config_file(CONFIG).study.report      # no arg: every arm, then the report
  for bad in ("g2", "g1,short"):
    with pytest.raises(ValueError, match="configs/study.py"):
      load(bad)
  with pytest.raises(ValueError, match="unknown study arm"):
    study_arms.parse_names("detailflow,g3")


def test_every_arm_is_the_pipeline_with_its_switches_only():
  config = load("all")
  base, none = study_arms.arm_config(config, "detailflow")
  assert none == {} and base.job == "pipeline"
  assert not set(study_arms.STUDY_ONLY_KEYS) & set(base.keys())
  base_flat = flat(base)
  expected = {
      "no_degrade": {"tokenizer_run.data.degrade_prob": (0.2, 0.0)},
      "bidirectional": {"tokenizer_run.tokenizer.latent_mask": ("group_causal", "bidirectional")},
      "no_correction": {"tokenizer_run.data.correction_prob": (0.25, 0.0),
                        "ar_run.data.correction_prob": (0.3, 0.0)},
      "g1": {"tokenizer_run.tokenizer.group_size": (4, 1),
             "tokenizer_run.tokenizer.causal_num": (4, 1), "ar_run.gpt.group_size": (4, 1),
             "ar_run.gpt.causal_num": (4, 1),
             "tokenizer_eval.token_counts": ((), (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32))},
      "detailflow_seed1": {"tokenizer_run.seed": (42, 43), "ar_run.seed": (0, 1)},
  }
  for name, switches in expected.items():
    arm, changed = study_arms.arm_config(config, name)
    assert changed == switches, name
    arm_flat = flat(arm)
    differing = {k for k in base_flat if arm_flat[k] != base_flat[k]}
    assert differing == set(switches), name
    # Same sampling settings and judge everywhere.
    assert arm.sample.to_dict() == base.sample.to_dict()
  # Overrides reach every arm: the switches are applied to the config as given.
  config.tokenizer_run.train.num_steps = 77
  assert study_arms.arm_config(config, "g1")[0].tokenizer_run.train.num_steps == 77


def test_group_size_1_samples_one_code_per_step():
  """The sampler accepts g = 1 (no special tokens) and takes N steps; g = 4 takes c + (N - c) / g."""
  config = load("all,smoke")
  steps = {}
  for name in ("detailflow", "g1"):
    gpt_cfg = gpt_model.GPTConfig.from_dict(study_arms.arm_config(config, name)[0].ar_run.gpt.to_dict())
    params = gpt_model.init_params(gpt_cfg, jax.random.PRNGKey(0))
    # g = 1 has no special tokens, and no zero-size param (orbax refuses to save one).
    assert ("spe_tok_embeddings" in params) == (gpt_cfg.group_size > 1)
    fake = types.SimpleNamespace(gpt=params, gpt_config=gpt_cfg)
    settings = dict(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, gradual_cfg=False)
    steps[name] = study.count_steps(fake, settings)
    codes = sampling.generate_codes(params, gpt_cfg, np.arange(2, dtype=np.int32),
                                    rng=jax.random.PRNGKey(1), cfg_scale=2.0)
    assert codes.shape == (2, 32)
  assert steps == {"detailflow": 4 + (32 - 4) // 4, "g1": 32}


def test_folder_switch(tmp_path):
  for split in ("train", "test"):
    for name in ("a", "b", "c"):
      (tmp_path / split / name).mkdir(parents=True)
      Image.new("RGB", (64, 64)).save(tmp_path / split / name / "0.png")
  config = load("all")
  config.data.folder = str(tmp_path)
  adjusted = study.data_adjusted(config)
  tok, ar = adjusted.tokenizer_run, adjusted.ar_run
  assert (tok.data.source, tok.data.folder, tok.tokenizer.image_size) == ("folder", str(tmp_path), 64)
  assert (ar.extract.source, ar.data.folder, ar.gpt.num_classes) == ("folder", str(tmp_path), 3)
  assert ar.gpt.block_size == tok.tokenizer.num_tokens == 64
  g1, _ = study_arms.arm_config(adjusted, "g1")
  assert g1.tokenizer_run.tokenizer.image_size == 64 and g1.ar_run.gpt.group_size == 1
  assert len(g1.tokenizer_eval.token_counts) == 4 + 60 // 4   # the folder tokenizer's n
  assert study.data_adjusted(load("all")).tokenizer_run.data.source == "fashion_mnist"


# ------------------------------------------------------------------ the report from fake files

TOKENS = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32)
# Judge accuracy on short prefixes: the DetailFlow tokenizers recognisable, the others not.
PREFIX_ACCURACY = dict(detailflow=0.60, detailflow_seed1=0.58, no_degrade=0.20,
                       bidirectional=0.55, no_correction=0.6, g1=0.6)
CLASSIFIER_FD = dict(detailflow=50.0, detailflow_seed1=51.0, no_correction=60.0, g1=49.0)


def write_json(path, payload):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload))


def fake_arm(root, name, sweep=()):
  arm = root / name
  for model in ("tokenizer", "ar"):
    (arm / model / "checkpoints" / "4" / "state").mkdir(parents=True)
  write_json(arm / "summary.json", dict(sample_class_accuracy=0.7, classifier_fd=55.0,
                                        total_seconds=900.0))
  per_n = {str(n): dict(n=n, content_resolution=n, decoder_size=32, psnr_full=10 + n / 4,
                        psnr_degraded=20.0,
                        classifier_accuracy=0.9 if n == 32 else PREFIX_ACCURACY[name],
                        classifier_fd=5.0) for n in TOKENS}
  write_json(arm / "tokenizer_eval" / "metrics.json", dict(per_n=per_n, summary={}))
  scales = [(2.0, 0, 1)] + [(s, 1, 1) for s in sweep]
  for scale, seed, per_class in scales:
    fd = CLASSIFIER_FD.get(name, 50.0) if seed == 0 else 40 + (scale - 2.5) ** 2
    write_json(arm / "eval_generator" / f"study-cfg{scale:g}-seed{seed}-per_class{per_class}" /
               "metrics.json",
               dict(metrics=dict(classifier_in_class_fraction=0.8, classifier_fd=fd),
                    sampling=dict(gpt_step=4, tokenizer_step=4, num_samples=10, cfg_scale=scale,
                                  seed=seed), timing={}))


def test_report_from_fake_result_files(tmp_path):
  config = load("report,smoke")
  config.study.sweep_cfg_scales = "1.0,2.0,3.0"
  config.study.speed_repeats = 0     # no models to time
  config.study.strip_images = 0      # no models to decode
  config.study.copy_figures_to = str(tmp_path / "docs_images")
  for name in study_arms.ARM_NAMES:
    fake_arm(tmp_path, name, sweep=(1.0, 2.0, 3.0) if name == "detailflow" else ())
  results = study.write_report(config, tmp_path)
  out = tmp_path / "report"
  text = (out / "report.md").read_text()
  assert json.loads((out / "report.json").read_text())["verdicts"] == json.loads(
      json.dumps(results["verdicts"]))
  # Ordering: mean judge accuracy over n < 32: 0.60 against 0.20, seeds 0.02 apart.
  assert tuple(results["verdicts"]["ordering"]) == ("reproduced", "classifier_accuracy")
  assert "| judge accuracy on decode(first n) | no_degrade | 0.600 | 0.200 | 0.400 | 0.020 | " \
         "reproduced |" in text
  # Bidirectional: 0.05 against 2 x 0.02: reproduced on accuracy too.
  assert "| judge accuracy on decode(first n) | bidirectional | 0.600 | 0.550 | 0.050 | 0.020 | " \
         "reproduced |" in text
  # PSNR vs full image is the same in every arm: inconclusive.
  assert "| PSNR vs full image (dB) | no_degrade | 12.950 | 12.950 | 0.000 | 0.000 | " \
         "inconclusive |" in text
  # Self-correction: classifier FD 50 (on) vs 60 (off), seed spread 1: reproduced.
  assert tuple(results["verdicts"]["correction"]) == ("reproduced", "classifier_fd")
  assert "| classifier_fd | -10.000 | 1.000 | reproduced |" in text
  assert "| no_correction | 0.800 | 60.00 | - | - | - | 10 | 2 | 0 |" in text
  # Group size: not timed here.
  assert results["verdicts"]["group_size"][0] == "inconclusive (speed not measured)"
  # Guidance: lowest classifier FD at CFG 2.0 (40 + (s - 2.5)^2 over 1, 2, 3: 2 and 3 tie at 40.25).
  assert results["guidance"] == dict(best_cfg=2.0, by="classifier_fd")
  for name, size in (("ordering_curves.png", (840, 600)), ("cfg_sweep.png", (1260, 300))):
    assert Image.open(out / name).size == size
    assert (tmp_path / "docs_images" / name).is_file()
  assert not (out / "ordering_strip.png").exists()


def run_smoke_study(workdir, fmnist_dir, *extra):
  command = [sys.executable, "-m", "detailflow_jax.main", f"--config={CONFIG}:all,smoke",
             f"--workdir={workdir}",
             f"--config.tokenizer_run.data.fashion_mnist_dir={fmnist_dir}",
             f"--config.ar_run.data.fashion_mnist_dir={fmnist_dir}", *extra]
  out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3600,
                       check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out


def check_smoke_report(workdir, out, arms):
  report = json.loads((workdir / "report" / "report.json").read_text())
  assert {k: v["steps"] for k, v in report["speed"].items()} == {"detailflow": 11, "g1": 32}
  for name in ("ordering_curves.png", "ordering_strip.png", "cfg_sweep.png"):
    assert (workdir / "report" / name).is_file()
  for i, name in enumerate(arms, 1):
    assert f"study: arm {i}/{len(arms)} {name}:" in out.stdout
  g1 = report["speed"]["g1"]
  assert f"| g1 | 1 | {g1['num_tokens']} | 32 |" in (workdir / "report" / "report.md").read_text()


def test_smoke_study_of_two_arms_runs_reports_and_resumes(tmp_path, fake_fmnist_dir):
  """The study command at smoke size with the two arms of the group-size claim, then the report
  with the real models (sampler steps 11 at g = 4 and 32 at g = 1, strip, figures); the same
  command again finds both arms complete. The six-arm run is the slow test below."""
  arms = ("detailflow", "g1")
  flag = f"--config.study.arms={','.join(arms)}"
  out = run_smoke_study(tmp_path / "study", fake_fmnist_dir, flag)
  check_smoke_report(tmp_path / "study", out, arms)
  rerun = run_smoke_study(tmp_path / "study", fake_fmnist_dir, flag)
  assert rerun.stdout.count("complete (") == len(arms)


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path, fake_fmnist_dir):
  """Every arm through the smoke pipeline, then the report, then the resume (minutes on 2
  cores)."""
  out = run_smoke_study(tmp_path / "study", fake_fmnist_dir)
  check_smoke_report(tmp_path / "study", out, study_arms.ARM_NAMES)
  rerun = run_smoke_study(tmp_path / "study", fake_fmnist_dir)
  assert rerun.stdout.count("complete (") == len(study_arms.ARM_NAMES)
