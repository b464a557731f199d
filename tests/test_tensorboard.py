"""What the jobs write to TensorBoard (train/metrics_writer.py and its callers): the config text
of every job, the tokenizer's coarse-to-fine strips, the sample job's grid and strip, and the
evaluation figures, read back from the event files (TFRecord framing around tensorboardX's
Event protos; tensorboard itself is not a dependency)."""
import glob
import io
import json
import os
import pathlib
import struct
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from detailflow_jax import api
from detailflow_jax.config import files
from detailflow_jax.jobs import eval_generator
from detailflow_jax.jobs import eval_tokenizer
from detailflow_jax.jobs import pipeline
from detailflow_jax.jobs import sample
from detailflow_jax.models import tokenizer as tokenizer_model
from detailflow_jax.train import metrics_writer
from detailflow_jax.train import tokenizer_visuals

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
import training_runs as runs  # pylint: disable=g-import-not-at-top,wrong-import-position


def read_events(logdir):
  """{tag: {step: summary value}} of the event files directly in `logdir` (TFRecord framing:
  u64 length, u32 crc, payload, u32 crc). Closes this process's writers first: tensorboardX's
  flush does not wait for the events its writer thread has not taken yet."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  metrics_writer.close_tensorboard_writers()
  found = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data = pathlib.Path(path).read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack_from("<Q", data, pos)
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        found.setdefault(value.tag, {})[event.step] = value
  return found


def image_of(value):
  """The decoded RGB image of an image summary value, checked against its declared size."""
  assert value.HasField("image")
  with Image.open(io.BytesIO(value.image.encoded_image_string)) as image:
    pixels = np.asarray(image.convert("RGB"))
  assert pixels.shape[:2] == (value.image.height, value.image.width)
  return pixels


def text_of(value):
  assert value.metadata.plugin_data.plugin_name == "text"
  return value.tensor.string_val[0].decode()


def config_of(value):
  """The JSON inside the fenced markdown block of the config text."""
  text = text_of(value)
  assert text.startswith("```json\n") and text.endswith("\n```")
  return json.loads(text[len("```json\n"):-len("\n```")])


# tensorboardX stores add_text(tag, ...) under `tag/text_summary`, as tf.summary.text did.
CONFIG = metrics_writer.CONFIG_TAG + "/text_summary"


def png(path):
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(autouse=True)
def _close_writers():
  yield
  metrics_writer.close_tensorboard_writers()


def test_writers_share_one_event_file_per_folder(tmp_path):
  config = ml_collections.ConfigDict(dict(job="train_tokenizer", train=dict(num_steps=3)))
  metrics_writer.write_config(tmp_path, config)
  picture = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
  metrics_writer.write_images(tmp_path, 5, {"a/picture": picture})
  metrics_writer.write_scalars(tmp_path, 3, {"a/number": 1.5, "a/missing": None})
  logdir = tmp_path / "tensorboard"
  events = read_events(logdir)
  assert len(glob.glob(str(logdir / "events.out.tfevents.*"))) == 1
  assert set(events) == {CONFIG, "a/picture", "a/number"}
  assert config_of(events[CONFIG][0]) == config.to_dict()
  np.testing.assert_array_equal(image_of(events["a/picture"][5]), picture)
  assert events["a/number"][3].simple_value == 1.5


def test_large_pictures_are_shrunk_for_tensorboard():
  picture = np.zeros((90, 30, 3), np.uint8)
  assert metrics_writer.shrink_to_side(picture, 40).shape == (30, 10, 3)
  assert metrics_writer.shrink_to_side(picture, 90) is picture
  assert metrics_writer.shrink_to_side(picture[..., :1], 40).shape == (30, 10, 1)


def test_tokenizer_job_writes_config_and_strips(tmp_path, fake_fmnist_dir):
  """main.py writes the config text; the strips hook writes each strip at its step."""
  workdir = tmp_path / "run"
  out = runs.run(runs.main_command(workdir, fake_fmnist_dir, "--config.train.num_steps=2",
                                   "--config.train.image_every=2",
                                   "--config.tokenizer.num_tokens=8"),
                 runs.cpu_env(), timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  events = read_events(workdir / "tensorboard")
  config = config_of(events[CONFIG][0])
  assert config["job"] == "train_tokenizer" and config["train"]["image_every"] == 2
  assert config["tokenizer"]["num_tokens"] == 8
  strip = image_of(events[tokenizer_visuals.TENSORBOARD_TAG][2])
  np.testing.assert_array_equal(strip, png(workdir / "images" / "strip_0000002.png"))
  # 8 examples by (token list + the input) cells of image_size, in a padded grid.
  side = config["tokenizer"]["image_size"]
  assert strip.shape[0] > tokenizer_visuals.NUM_EXAMPLES * side
  assert "train/loss" in events and 2 in events["train/loss"]


def test_sample_outputs_go_to_tensorboard(tmp_path):
  config = files.load_config_file(str(REPO / "configs" / "tokenizer_tiny.py:smoke"))
  config.tokenizer.num_tokens = 8
  tokenizer = api.tokenizer_params(
      tokenizer_model.init_params(config.tokenizer, jax.random.PRNGKey(0)), config.tokenizer)
  num_classes, per_class = 10, 1
  labels = sample.class_labels(num_classes, per_class)
  codes = np.random.default_rng(0).integers(0, config.tokenizer.codebook_size,
                                            (len(labels), config.tokenizer.num_tokens))
  sample.write_outputs(tmp_path, tokenizer, codes, labels, num_classes, per_class,
                       tensorboard_step=7)
  events = read_events(tmp_path / "tensorboard")
  assert set(events) == {"sample/grid", "sample/coarse_to_fine"}
  np.testing.assert_array_equal(image_of(events["sample/grid"][7]), png(tmp_path / "grid.png"))
  np.testing.assert_array_equal(image_of(events["sample/coarse_to_fine"][7]),
                                png(tmp_path / "coarse_to_fine.png"))


def test_eval_tokenizer_curves_have_n_as_step(tmp_path):
  per_n = {}
  for n, psnr in ((1, 10.0), (4, 14.0), (8, 20.0)):
    entry = {k: None for k in eval_tokenizer.TENSORBOARD_PER_N}
    entry.update(n=n, psnr_full=psnr, content_resolution=4 * n, codebook_usage=0.5)
    per_n[str(n)] = entry
  summary = dict(num_tokens=8, ssim_official_protocol=0.7, classifier_real_accuracy=0.9,
                 classifier_real_fd=None)
  run = eval_tokenizer.tensorboard_run(1300, use_ema=True)
  assert run == "eval_tokenizer/step_0001300_ema"
  eval_tokenizer.write_tensorboard(tmp_path, run, per_n, summary)
  events = read_events(tmp_path / "tensorboard" / run)
  assert set(events) == {"eval_tokenizer/psnr_full", "eval_tokenizer/content_resolution",
                         "eval_tokenizer/codebook_usage", "eval_tokenizer/ssim_official_protocol",
                         "eval_tokenizer/classifier_real_accuracy"}  # None is left out
  assert {s: v.simple_value for s, v in events["eval_tokenizer/psnr_full"].items()} == {
      1: 10.0, 4: 14.0, 8: 20.0}
  assert sorted(events["eval_tokenizer/classifier_real_accuracy"]) == [1, 4, 8]
  assert list(events["eval_tokenizer/ssim_official_protocol"]) == [8]


def test_eval_generator_metrics_at_the_gpt_step(tmp_path):
  metrics = dict(num_images=100, fid=12.5, sfid=None, precision=0.6, recall=0.4,
                 reference_num_images=1000, classifier_fd=3.0,
                 classifier_in_class_fraction=0.8,
                 classifier_per_class_accuracy={0: 0.7, 1: 0.9})
  eval_generator.write_tensorboard(tmp_path, "cfg2.0", 800, metrics)
  events = read_events(tmp_path / "tensorboard" / "eval_generator" / "cfg2.0")
  assert {tag: list(steps) for tag, steps in events.items()} == {
      f"eval_generator/{k}": [800] for k in (
          "fid", "precision", "recall", "classifier_fd", "classifier_in_class_fraction",
          "classifier_per_class_accuracy/0", "classifier_per_class_accuracy/1")}
  assert events["eval_generator/fid"][800].simple_value == 12.5


def test_pipeline_writes_each_stage_config(tmp_path):
  config = files.load_config_file(str(REPO / "configs" / "default.py:smoke"))
  cfg = pipeline.stage_configs(config, tmp_path)
  pipeline.write_stage_configs(config, cfg, tmp_path)
  for key, folder in pipeline.STAGE_DIRS.items():
    events = read_events(tmp_path / folder / "tensorboard")
    assert config_of(events[CONFIG][0]) == json.loads(
        cfg[key].to_json_best_effort()), key
  events = read_events(tmp_path / "tokenizer_eval" / "tensorboard")
  assert config_of(events[CONFIG][0])["num_images"] == config.tokenizer_eval.num_images
