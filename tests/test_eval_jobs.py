"""Evaluation jobs on tiny random models: eval_tokenizer, eval_generator, eval_fid_reference.

The FID Inception network is replaced by a small fixed random feature map (compiling the real
one takes about a minute on a small CPU); the FID arithmetic, the per-n bookkeeping and the files
the jobs write are what these tests check. The real network is tested in test_inception.py.
"""
import copy
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from detailflow_jax.config import files
from detailflow_jax import detail
from detailflow_jax.eval import fid as fid_lib
from detailflow_jax.eval import plots
from detailflow_jax.eval import reference as reference_lib
from detailflow_jax.eval import tokenizer_report
from detailflow_jax.jobs import eval_common
from detailflow_jax.jobs import eval_fid_reference
from detailflow_jax.jobs import eval_generator
from detailflow_jax.jobs import eval_tokenizer
from detailflow_jax.models import gpt as gpt_model
from detailflow_jax.models import tokenizer as tokenizer_model
from detailflow_jax.train import checkpoints
from fake_fashion_mnist import write_fake_fashion_mnist

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# A random tokenizer's 1-token decodes are near-identical images: their feature covariance is
# singular, which the FID code handles (ADM's eps retry) after scipy warns.
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")


def load_config(name):
  return files.load_config_file(str(REPO_ROOT / "configs" / name))


class FakeExtractor:
  """Stands in for the Inception network: fixed random projections of 4x4-pooled pixels."""

  def __init__(self, weights_path, batch_size, mesh=None):
    del weights_path, mesh
    self.batch_size = batch_size
    rng = np.random.default_rng(0)
    self.pool_map = rng.normal(size=(48, 4))
    self.spatial_map = rng.normal(size=(48, 3))
    self.calls = 0

  def __call__(self, batches, max_images=None):
    pools, spatials = [], []
    for batch in batches:
      self.calls += 1
      x = np.asarray(batch, np.float64) / 255.0
      x = np.broadcast_to(x, x.shape[:3] + (3,))
      h, w = x.shape[1] // 4, x.shape[2] // 4
      pooled = x[:, :4 * h, :4 * w].reshape(len(x), 4, h, 4, w, 3).mean(axis=(2, 4))
      flat = pooled.reshape(len(x), -1)
      pools.append(np.tanh(flat @ self.pool_map))
      spatials.append(np.tanh(flat @ self.spatial_map))
    pool, spatial = np.concatenate(pools), np.concatenate(spatials)
    if max_images:
      pool, spatial = pool[:max_images], spatial[:max_images]
    return fid_lib.InceptionFeatures(pool.astype(np.float32), spatial.astype(np.float32))

  def describe(self):
    return dict(network="fake")


@pytest.fixture(autouse=True)
def fake_inception(monkeypatch):
  monkeypatch.setattr(eval_common, "make_feature_extractor", FakeExtractor)


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fashion")
  write_fake_fashion_mnist(directory, num_train=40, num_test=10)
  return directory


def judge_cache_dir(fashion_dir):
  """The fixed judge of the fake data set, trained once (one epoch) beside it, not in ~/.cache;
  shared by the tokenizer and generator evaluations (same data, epochs and seed)."""
  return str(pathlib.Path(fashion_dir).parent / "judge_cache")


def save_workdir(workdir, config, state):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort())
  saver = checkpoints.Checkpointer(workdir)
  saver.save(7, state)
  saver.close()


@pytest.fixture(scope="module")
def tokenizer_workdir(tmp_path_factory):
  config = load_config("tokenizer_tiny.py:smoke")
  params = tokenizer_model.init_params(config.tokenizer, jax.random.PRNGKey(0))
  workdir = tmp_path_factory.mktemp("tokenizer")
  save_workdir(workdir, config, dict(step=np.int32(7), params=dict(tokenizer=params),
                                     ema_params={}))
  return workdir, config


@pytest.fixture(scope="module")
def gpt_workdir(tmp_path_factory, tokenizer_workdir):
  tok_dir, tok_config = tokenizer_workdir
  t = tok_config.tokenizer
  config = load_config("ar_tiny.py") if (REPO_ROOT / "configs" / "ar_tiny.py").exists() else None
  if config is None or "gpt" not in config:
    from detailflow_jax.config import defaults  # pylint: disable=g-import-not-at-top
    config = defaults.ar_training_config("B")
  g = config.gpt
  g.vocab_size, g.block_size = t.codebook_size, t.num_tokens
  g.group_size, g.causal_num, g.num_classes = t.group_size, t.causal_num, 10
  g.num_layers, g.dim, g.num_heads = 1, 32, 2
  config.extract.tokenizer_workdir = str(tok_dir)
  gpt_config = gpt_model.GPTConfig.from_dict(g.to_dict())
  params = gpt_model.init_params(gpt_config, jax.random.PRNGKey(1))
  # The official init zeroes the output head (uniform logits); draw it so samples vary.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.5 * jax.random.normal(jax.random.PRNGKey(len(path)), x.shape), params)
  workdir = tmp_path_factory.mktemp("ar")
  save_workdir(workdir, config, dict(step=np.int32(7), params=params, ema_params=params))
  return workdir


# ------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, tokenizer_workdir, fashion_dir):
  tok_dir, _ = tokenizer_workdir
  config = load_config("eval_tokenizer_tiny.py")
  config.data.fashion_mnist_dir = str(fashion_dir)
  config.eval.tokenizer_workdir = str(tok_dir)
  config.eval.num_images = 6     # two batches of 4, the second cut to 2 images
  config.eval.batch_size = 4
  config.eval.inception_batch_size = 4
  config.eval.lpips_token_counts = (32,)  # LPIPS-VGG compiles slowly: one image size only
  config.eval.judge_cache_dir = judge_cache_dir(fashion_dir)
  config.eval.judge_epochs = 1
  out = tmp_path_factory.mktemp("eval_tokenizer_out")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(eval_common, "make_feature_extractor", FakeExtractor)
    payload = eval_tokenizer.evaluate_tokenizer(config, str(out))
  return payload, out, tokenizer_workdir[1]


def test_eval_tokenizer_writes_every_n(tokenizer_run):
  payload, out, tok_config = tokenizer_run
  written = json.loads((out / "eval_tokenizer" / "metrics.json").read_text())
  schedule = detail.resolution_schedule(tok_config.tokenizer)
  assert list(written["per_n"]) == [str(n) for n in schedule.token_list]
  assert set(written["summary"]) == {
      "num_tokens", "num_images", "rfid", "rprecision", "rrecall", "psnr", "ssim", "lpips",
      "ssim_official_protocol", "codebook_usage", "perplexity", "classifier_accuracy",
      "classifier_fd", "classifier_real_accuracy", "classifier_real_fd"}
  for key, entry in written["per_n"].items():
    n = int(key)
    assert entry["num_images"] == 6
    assert entry["decoder_size"] == schedule.decoder_size(n)
    assert entry["content_resolution"] == schedule.content_resolution(n)
    for name in ("psnr_full", "psnr_degraded", "rfid"):
      assert np.isfinite(entry[name]), (n, name)
    # Fractions of the 6 reconstructions (precision) and of the 6 real images (recall).
    for name in ("rprecision", "rrecall"):
      assert 0 <= entry[name] <= 1 and entry[name] * 6 == pytest.approx(round(entry[name] * 6))
    for name in ("ssim_full", "ssim_degraded"):
      assert -1.0 <= entry[name] <= 1.0, (n, name)
    assert 0 < entry["codebook_usage"] <= 1
    assert 1 <= entry["perplexity"] <= tok_config.tokenizer.codebook_size
    # The fixed judge on the full-size decodes of the 6 images (Fashion-MNIST data source).
    assert 0 <= entry["classifier_accuracy"] <= 1, n
    assert entry["classifier_accuracy"] * 6 == pytest.approx(round(entry["classifier_accuracy"] * 6))
    assert np.isfinite(entry["classifier_fd"]) and entry["classifier_fd"] >= 0, n
    if n == schedule.num_tokens:
      assert 0 < entry["lpips_full"] < 2
    else:
      assert entry["lpips_full"] is None
  full = written["per_n"][str(schedule.num_tokens)]
  # At n = N the degraded target is the image itself: both comparisons are the same numbers.
  assert full["psnr_degraded"] == pytest.approx(full["psnr_full"], rel=1e-6)
  assert written["summary"]["psnr"] == full["psnr_full"]
  assert written["summary"]["lpips"] == full["lpips_full"]
  s = written["summary"]
  assert s["classifier_accuracy"] == full["classifier_accuracy"]
  assert s["classifier_fd"] == full["classifier_fd"]
  assert 0 <= s["classifier_real_accuracy"] <= 1 and np.isfinite(s["classifier_real_fd"])
  classifier = written["settings"]["classifier"]
  assert pathlib.Path(classifier["cache"]).is_file() and classifier["epochs"] == 1
  assert -1 <= written["summary"]["ssim_official_protocol"] <= 1
  # Codes of a longer prefix include the shorter one's: usage can only grow with n.
  usage = [e["codebook_usage"] for e in written["per_n"].values()]
  assert usage == sorted(usage)
  assert written["settings"]["checkpoint_step"] == 7
  assert written["settings"]["config"]["eval"]["num_images"] == 6
  assert payload["summary"] == written["summary"]


def test_eval_tokenizer_curve_png(tokenizer_run, tmp_path):
  payload, out, _ = tokenizer_run
  # Every figure was computed (rFID every n, LPIPS at n = 32, the judge): 8 panels, 4 rows.
  with Image.open(out / "eval_tokenizer" / "curve.png") as image:
    assert image.size == (2 * plots.PANEL_SIZE[0], 4 * plots.PANEL_SIZE[1])
    colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
  assert len(colors) > 3  # text, axes and coloured lines were drawn
  chart = tokenizer_report.plot_curves(
      payload["per_n"], tmp_path / "again.png",
      real_accuracy=payload["summary"]["classifier_real_accuracy"])
  assert len(chart.titles) == 8 and "judge accuracy (full-size decode)" in chart.titles


def test_eval_tokenizer_table(tokenizer_run):
  payload, _, _ = tokenizer_run
  lines = tokenizer_report.format_table(payload["per_n"], payload["summary"]).splitlines()
  assert "cls acc" in lines[0] and lines[0].endswith("cls FD")
  assert len(lines) == 1 + len(payload["per_n"]) + 1  # header, one row per n, the ceiling
  first, last = list(payload["per_n"].values())[0], payload["per_n"]["32"]
  assert lines[1].split()[-2:] == [f"{first['classifier_accuracy']:.4f}",
                                   f"{first['classifier_fd']:.3f}"]
  assert lines[1].split()[6] == "-"  # LPIPS only at n = 32
  assert lines[-2].split()[-2:] == [f"{last['classifier_accuracy']:.4f}",
                                    f"{last['classifier_fd']:.3f}"]
  assert lines[-1] == (f"judge on the real images (ceiling): accuracy "
                       f"{payload['summary']['classifier_real_accuracy']:.4f}, classifier FD "
                       f"{payload['summary']['classifier_real_fd']:.3f}")


def test_eval_tokenizer_reference_cache_is_eval_generators(tmp_path, tokenizer_workdir,
                                                           fashion_dir):
  """One Inception pass over the real split serves both jobs: the statistics eval_tokenizer
  writes to eval.reference_cache equal eval_generator's for the same split, a second evaluation
  reads them instead of running the network on the real images, and gets the same rFID."""
  tok_dir, _ = tokenizer_workdir
  config = load_config("eval_tokenizer_tiny.py")
  config.data.fashion_mnist_dir = str(fashion_dir)
  config.eval.tokenizer_workdir = str(tok_dir)
  config.eval.update(num_images=0, batch_size=5, inception_batch_size=5, token_counts=(8,),
                     fid_token_counts=(32,), compute_lpips=False, compute_classifier=False,
                     reference_cache=str(tmp_path / "test-stats.npz"))
  first = eval_tokenizer.evaluate_tokenizer(config, str(tmp_path / "a"))
  assert first["summary"]["classifier_accuracy"] is None  # eval.compute_classifier=False
  assert first["per_n"]["8"]["classifier_fd"] is None and first["settings"]["classifier"] is None
  written = reference_lib.load_reference(config.eval.reference_cache)
  assert written.num_images == 10

  gen = load_config("eval_generator_tiny.py")
  gen.data.fashion_mnist_dir = str(fashion_dir)
  gen.eval.inception_batch_size = 5
  generator_ref, _ = eval_generator.reference_statistics(
      gen.eval, gen, FakeExtractor(None, 5), 32, tmp_path / "gen")
  np.testing.assert_allclose(written.pool.mu, generator_ref.pool.mu, rtol=1e-12)
  np.testing.assert_allclose(written.pool.sigma, generator_ref.pool.sigma, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(written.spatial.mu, generator_ref.spatial.mu, rtol=1e-12)

  calls = []

  class CountingExtractor(FakeExtractor):
    def __call__(self, batches, max_images=None):
      batches = list(batches)
      calls.extend(len(b) for b in batches)
      return super().__call__(iter(batches), max_images)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(eval_common, "make_feature_extractor", CountingExtractor)
    second = eval_tokenizer.evaluate_tokenizer(config, str(tmp_path / "b"))
  assert sum(calls) == 10  # the reconstructions only (n = 32), not the real images again
  assert second["summary"]["rfid"] == first["summary"]["rfid"]
  assert second["summary"]["rrecall"] == first["summary"]["rrecall"] is not None
  assert second["settings"]["reference_cache"] == config.eval.reference_cache

  config.eval.num_images = 5
  with pytest.raises(ValueError, match=r"statistics of 10 images but this evaluation read 5"):
    eval_tokenizer.evaluate_tokenizer(config, str(tmp_path / "c"))


def test_eval_token_counts_validation(tokenizer_workdir):
  schedule = detail.resolution_schedule(tokenizer_workdir[1].tokenizer)
  e = load_config("eval_tokenizer_tiny.py").eval
  e.token_counts = (4, 8)
  e.fid_token_counts = (8,)
  assert eval_tokenizer.eval_token_counts(e, schedule) == ([4, 8, 32], [8], [4, 8, 32])
  e.compute_lpips = False
  assert eval_tokenizer.eval_token_counts(e, schedule) == ([4, 8, 32], [8], [])
  e.token_counts = (0, 8)
  with pytest.raises(ValueError, match=r"eval.token_counts \[0\] outside \[1, num_tokens=32\]"):
    eval_tokenizer.eval_token_counts(e, schedule)
  e.token_counts = (4,)
  e.fid_token_counts = (8,)
  with pytest.raises(ValueError, match="eval.fid_token_counts"):
    eval_tokenizer.eval_token_counts(e, schedule)
  # At a smaller image size (eval.image_size) the prefixes stop at that size's token count.
  e.token_counts, e.fid_token_counts = (), ()
  assert eval_tokenizer.eval_token_counts(e, schedule, 20)[0] == [1, 2, 3, 4, 8, 12, 16, 20]


def test_eval_at_an_unsupported_size_lists_the_sizes(tmp_path, tokenizer_workdir):
  config = load_config("eval_tokenizer_tiny.py")
  config.eval.tokenizer_workdir = str(tokenizer_workdir[0])
  config.eval.image_size = 20
  with pytest.raises(ValueError, match=r"image_size=20 is not supported .*supported sizes: \[32\]"):
    eval_tokenizer.evaluate_tokenizer(config, str(tmp_path))


def test_evaluate_prefixes_for_the_pipeline(tmp_path, tokenizer_workdir, fashion_dir,
                                           monkeypatch):
  """The pipeline's tokenizer_eval section has no compute_classifier key: the judge is on."""
  tok_dir, tok_config = tokenizer_workdir
  data = copy.deepcopy(tok_config.data)
  data.fashion_mnist_dir = str(fashion_dir)
  monkeypatch.setenv("DETAILFLOW_JUDGE_CACHE", judge_cache_dir(fashion_dir))
  overrides = ml_collections.ConfigDict(dict(num_images=4, batch_size=4, split="test",
                                             use_ema=False, judge_epochs=1))
  payload = eval_tokenizer.evaluate_prefixes(str(tok_dir), str(tmp_path / "out"), overrides, data)
  assert (tmp_path / "out" / "metrics.json").is_file() and (tmp_path / "out" / "curve.png").is_file()
  assert payload["summary"]["rfid"] is None and payload["summary"]["lpips"] is None
  assert payload["summary"]["rrecall"] is None
  assert payload["summary"]["num_images"] == 4
  assert all(np.isfinite(e["psnr_degraded"]) for e in payload["per_n"].values())
  assert all(0 <= e["classifier_accuracy"] <= 1 for e in payload["per_n"].values())
  assert payload["settings"]["classifier"]["cache"].startswith(judge_cache_dir(fashion_dir))
  # No rFID or LPIPS: their panels are left out (PSNR, SSIM, usage, perplexity, judge x 2).
  with Image.open(tmp_path / "out" / "curve.png") as image:
    assert image.size == (2 * plots.PANEL_SIZE[0], 3 * plots.PANEL_SIZE[1])
  overrides.bogus = 1
  with pytest.raises(ValueError, match=r"unknown tokenizer eval keys \['bogus'\]"):
    eval_tokenizer.evaluate_prefixes(str(tok_dir), str(tmp_path / "out"), overrides, data)


def test_codebook_statistics():
  usage, perplexity = eval_tokenizer.codebook_statistics(np.array([2, 2, 0, 0]))
  assert usage == 0.5 and perplexity == pytest.approx(2.0)


def test_missing_ema_is_a_clear_error(tokenizer_workdir):
  with pytest.raises(ValueError, match=r"no EMA weights .*use_ema=False"):
    eval_common.load_tokenizer(str(tokenizer_workdir[0]), use_ema=True)
  with pytest.raises(ValueError, match=r"step=3 has no checkpoint .*available steps: \[7\]"):
    eval_common.load_tokenizer(str(tokenizer_workdir[0]), step=3)


# ------------------------------------------------------------------------------ generator


def generator_config(fashion_dir, gpt_dir, **overrides):
  config = load_config("eval_generator_tiny.py")
  config.data.fashion_mnist_dir = str(fashion_dir)
  config.eval.gpt_workdir = str(gpt_dir)
  config.eval.tokenizer_workdir = ""  # taken from the AR run's extract.tokenizer_workdir
  config.eval.num_samples = 6
  config.eval.labels_per_class = 0
  config.eval.batch_size = 4
  config.eval.inception_batch_size = 4
  config.eval.judge_cache_dir = judge_cache_dir(fashion_dir)
  config.eval.judge_epochs = 1
  for key, value in overrides.items():
    config.eval[key] = value
  return config


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory, gpt_workdir, fashion_dir):
  out = tmp_path_factory.mktemp("eval_generator_out")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(eval_common, "make_feature_extractor", FakeExtractor)
    payload = eval_generator.evaluate_generator(generator_config(fashion_dir, gpt_workdir),
                                                str(out))
  return payload, out


def test_eval_generator_npz_and_settings(generator_run):
  payload, out = generator_run
  run_dir = pathlib.Path(payload["samples_npz"]).parent
  assert run_dir.parent == out / "eval_generator"
  with np.load(run_dir / "samples.npz") as samples:
    assert samples["arr_0"].shape == (6, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(samples["arr_1"], np.random.default_rng(0).integers(0, 10, 6))
    assert samples["arr_0"].std() > 0
  written = json.loads((run_dir / "metrics.json").read_text())
  s = written["sampling"]
  assert (s["cfg_scale"], s["temperature"], s["top_k"], s["top_p"]) == (2.0, 1.0, 0, 1.0)
  assert (s["num_samples"], s["num_tokens"], s["output_size"], s["seed"]) == (6, 32, 32, 0)
  assert s["gpt_step"] == 7 and s["gpt_use_ema"] is True and s["tokenizer_step"] == 7
  assert set(written["metrics"]) >= {"fid", "sfid", "precision", "recall", "num_images"}
  assert written["metrics"]["num_images"] == 6
  assert written["metrics"]["reference_num_images"] == 10
  assert np.isfinite(written["metrics"]["fid"]) and 0 <= written["metrics"]["precision"] <= 1
  assert written["settings"]["config"]["eval"]["cfg_scale"] == 2.0
  assert pathlib.Path(written["reference"]["cache"]).is_file()
  # Classifier FD (Fashion-MNIST): the fixed judge's features of the same samples.npz.
  m = written["metrics"]
  assert np.isfinite(m["classifier_fd"]) and m["classifier_fd"] > 0
  assert 0 <= m["classifier_in_class_fraction"] <= 1
  assert sorted(m["classifier_per_class_accuracy"]) == sorted(
      str(c) for c in set(samples_labels(run_dir)))
  assert m["classifier_fd_reference_num_images"] == 10
  classifier = written["settings"]["classifier"]
  assert pathlib.Path(classifier["cache"]).is_file() and classifier["epochs"] == 1


def samples_labels(run_dir):
  with np.load(run_dir / "samples.npz") as samples:
    return samples["arr_1"].tolist()


def test_eval_generator_classifier_fd_alone(generator_run, gpt_workdir, fashion_dir, monkeypatch):
  """compute_inception=False: the classifier figures only, from the samples already written,
  equal to the full run's, with no Inception pass."""
  payload, out = generator_run
  monkeypatch.setattr(eval_common, "make_feature_extractor",
                      lambda *a, **k: pytest.fail("Inception used"))
  alone = eval_generator.evaluate_generator(
      generator_config(fashion_dir, gpt_workdir, compute_inception=False), str(out))
  assert alone["samples_npz"] == payload["samples_npz"]
  assert "fid" not in alone["metrics"] and alone["reference"] is None
  assert alone["metrics"]["num_images"] == 6
  for key in ("classifier_fd", "classifier_in_class_fraction", "classifier_per_class_accuracy"):
    assert alone["metrics"][key] == payload["metrics"][key], key
  written = json.loads((pathlib.Path(alone["samples_npz"]).parent / "metrics.json").read_text())
  assert written["metrics"]["classifier_fd"] == alone["metrics"]["classifier_fd"]


def test_eval_generator_reuses_samples_and_is_batch_independent(generator_run, gpt_workdir,
                                                                  fashion_dir, capsys):
  payload, out = generator_run
  npz = pathlib.Path(payload["samples_npz"])
  stamp = npz.stat().st_mtime_ns
  eval_generator.evaluate_generator(generator_config(fashion_dir, gpt_workdir), str(out))
  assert "reusing" in capsys.readouterr().out
  assert npz.stat().st_mtime_ns == stamp
  # Sample i depends on (seed, i) only: a batch of 2 gives the same images as a batch of 4.
  again = eval_generator.evaluate_generator(
      generator_config(fashion_dir, gpt_workdir, batch_size=2, run_name="batch2",
                       compute_metrics=False), str(out))
  with np.load(npz) as first, np.load(again["samples_npz"]) as second:
    np.testing.assert_array_equal(first["arr_0"], second["arr_0"])
  assert again["metrics"] is None


def test_sample_labels():
  e = load_config("eval_generator_tiny.py").eval
  e.labels_per_class = 3
  np.testing.assert_array_equal(eval_generator.sample_labels(e, 4),
                                [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
  e.labels_per_class, e.num_samples = 0, 0
  with pytest.raises(ValueError, match="eval.num_samples > 0 or eval.labels_per_class > 0"):
    eval_generator.sample_labels(e, 4)


def test_pairing_mismatch_is_a_clear_error(tokenizer_workdir):
  gpt_config = gpt_model.GPTConfig(vocab_size=99, num_layers=1, dim=32, num_heads=2,
                                   block_size=32, group_size=4, causal_num=4)
  with pytest.raises(ValueError, match=r"do not match .*codebook_size \(64, 99\)"):
    eval_generator.api.check_pairing(tokenizer_workdir[1].tokenizer, gpt_config)


# ------------------------------------------------------------------------------ FID reference


def test_independent_fid_matches_evaluator():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(300, 24))
  b = 0.8 * rng.normal(size=(250, 24)) + 0.3 + a[:250] * 0.2
  ours = fid_lib.fid(fid_lib.statistics(a), fid_lib.statistics(b))
  assert eval_fid_reference.independent_fid(a, b) == pytest.approx(ours, abs=1e-6)


def test_eval_fid_reference_job(tmp_path, fashion_dir):
  config = load_config("eval_fid_reference.py:smoke")
  config.data.fashion_mnist_dir = str(fashion_dir)
  payload = eval_fid_reference.evaluate_fid_reference(config, str(tmp_path))
  written = json.loads((tmp_path / "eval_fid_reference" / "metrics.json").read_text())
  assert list(written["metrics"]) == ["test__vs__train_first_half", "test__vs__train_second_half",
                                      "train_first_half__vs__train_second_half"]
  for values in written["metrics"].values():
    assert values["num_images"] == [8, 8]
    assert values["fid_agrees"] and values["fid_abs_difference"] < 1e-3
  assert written["sets"]["train_second_half"]["first_index"] == 20
  # A second run reads the cached feature chunks instead of extracting again.
  eval_fid_reference.evaluate_fid_reference(config, str(tmp_path))
  assert payload["metrics"] == json.loads(
      (tmp_path / "eval_fid_reference" / "metrics.json").read_text())["metrics"]


def per_n_rows(**columns):
  """per_n entries for n = 1, 2, 4, 8 with the given columns (lists over n, None: missing)."""
  return {str(n): dict(n=n, **{k: v[i] for k, v in columns.items()})
          for i, n in enumerate((1, 2, 4, 8))}


def test_plot_draws_only_panels_with_data(tmp_path):
  none = [None] * 4
  per_n = per_n_rows(psnr_full=[10.0, 12.0, 15.0, 20.0], psnr_degraded=[30.0, 28.0, 25.0, 20.0],
                     ssim_full=[0.1, 0.2, 0.5, 0.9], ssim_degraded=none, lpips_full=none,
                     rfid=none, codebook_usage=[0.1, 0.2, 0.3, 0.4], perplexity=[2.0, 3.0, 5.0, 8.0])
  chart = tokenizer_report.plot_curves(per_n, tmp_path / "a.png")
  assert chart.titles == ["PSNR (dB)", "SSIM", "codebook usage (codes < n)",
                          "code perplexity (codes < n)"]
  with Image.open(tmp_path / "a.png") as image:
    assert image.size == (2 * plots.PANEL_SIZE[0], 2 * plots.PANEL_SIZE[1])
  # One rFID value (the others missing) is data: its panel comes back; so does the judge's.
  per_n["8"].update(rfid=3.5)
  for entry, acc in zip(per_n.values(), (0.1, 0.4, 0.7, 0.8)):
    entry.update(classifier_accuracy=acc, classifier_fd=10 * (1 - acc))
  chart = tokenizer_report.plot_curves(per_n, tmp_path / "b.png", real_accuracy=0.9)
  assert len(chart.titles) == 7 and "rFID (vs real images)" in chart.titles
  assert "LPIPS (vs full image)" not in chart.titles
  assert chart.image.size == (2 * plots.PANEL_SIZE[0], 4 * plots.PANEL_SIZE[1])
  # Series without data leave the legend; a grid with no data at all is an error.
  kept = plots.with_data([dict(title="t", series={"a": ([1, 2], [None, 1.0]),
                                                  "b": ([1, 2], [None, float("nan")])})])
  assert list(kept[0]["series"]) == ["a"]
  with pytest.raises(ValueError, match="no panel has data"):
    plots.line_chart_grid([dict(title="t", series={"a": ([1], [None])})], tmp_path / "c.png")


def test_plots_nice_ticks():
  assert plots.nice_ticks(0.0, 1.0) == [0.0, 0.5, 1.0]
  assert plots.nice_ticks(13.2, 27.9) == [10.0, 15.0, 20.0, 25.0, 30.0]
