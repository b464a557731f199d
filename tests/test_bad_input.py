"""Every bad input and fault a run can meet, each with the message the user gets.

Cases tested elsewhere (kept there, listed here so this file is the index):
  * unknown --config key from the command line, exit status 2 and the valid keys:
    test_tokenizer_trainer.py::test_unknown_config_key_lists_valid_keys
  * unknown job name: test_tokenizer_trainer.py::test_unknown_job_is_rejected
  * corrupt and truncated files in an image folder, at the source (skipped and counted, or
    fatal): test_data_sources.py::test_image_folder_layout_and_skip / test_image_folder_errors
  * global batch not divisible by the process count: test_data_pipeline.py::test_pipeline_errors
  * official tokenizer / DINO state dicts with missing or unexpected tensors:
    test_tokenizer_parity.py, test_discriminators.py
  * sampling labels outside [0, num_classes): test_sampling.py (labels ... valid range)
  * mesh vs device count at the command line, before compiling: test_distributed.py
    (compile check); SIGKILL at any point of a run: test_preemption.py
"""
import io
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from detailflow_jax.config import defaults
from detailflow_jax.config import files
from detailflow_jax import detail
from detailflow_jax.data import pipeline
from detailflow_jax.interop import gpt_state_dict
from detailflow_jax.models import gpt
from detailflow_jax.models import tokenizer as tokenizer_model
from detailflow_jax.models import weight_files
from detailflow_jax.train import checkpoints
from detailflow_jax.train import loop
from detailflow_jax.train import sharding
from scripts import training_runs as runs

SMOKE = runs.SMOKE


# --- config keys and contradicting values ---------------------------------------------------

def test_unknown_config_key_names_it_and_lists_valid_keys():
  with pytest.raises(ValueError) as error:
    files.check_overrides(["main.py", f"--config={SMOKE}", "--config.mesh.fdsp=4",
                                 "--config.train.num_steps=3"])
  message = str(error.value)
  assert message.startswith("Unknown config key(s): mesh.fdsp (in ")
  assert "Valid keys:" in message and "\n  mesh.fsdp\n" in message


def test_group_size_not_dividing_the_token_count():
  tok = defaults.tokenizer_model_config()
  tok.num_tokens, tok.group_size = 130, 8
  with pytest.raises(ValueError, match="num_tokens=130 must be a positive multiple of "
                                       "group_size=8"):
    detail.resolution_schedule(tok)
  with pytest.raises(ValueError, match="num_tokens=130 and causal_num=8 must be multiples of "
                                       "group_size=8"):
    tokenizer_model.validate_tokenizer_config(tok)
  with pytest.raises(ValueError, match="block_size=130 must be a multiple of group_size=8"):
    gpt.GPTConfig(block_size=130, group_size=8)


@pytest.mark.parametrize("mesh, devices, message", [
    (dict(data=3, fsdp=1, tensor=1), 8, r"mesh \{'data': 3, 'fsdp': 1, 'tensor': 1\} needs 3 "
     r"devices but 8 are available; set mesh.data/fsdp/tensor so their product is 8"),
    (dict(data=-1, fsdp=3, tensor=1), 8, "8 devices are not divisible by 3"),
    (dict(data=-1, fsdp=-1, tensor=1), 8, "at most one axis may be -1"),
    (dict(data=0, fsdp=8, tensor=1), 8, "axis sizes must be positive or -1"),
])
def test_mesh_not_matching_the_device_count(mesh, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(mesh, devices)
  assert sharding.mesh_shape(dict(data=-1, fsdp=4, tensor=1), 8) == (2, 4, 1)


def test_batch_not_divisible_by_the_data_axes():
  mesh = jax.sharding.AbstractMesh((2, 4, 1), sharding.MESH_AXES)
  with pytest.raises(ValueError, match=r"data.batch_size=12 is not divisible by the data x fsdp "
                                       r"mesh size 8 .* pick a multiple of 8"):
    sharding.check_batch_size(12, mesh)
  sharding.check_batch_size(16, mesh)


def test_contradiction_stops_the_command_before_training(tmp_path):
  out = subprocess.run(
      runs.main_command(tmp_path / "run", tmp_path, "--config.mesh.data=3"),
      cwd=runs.REPO, env=runs.cpu_env(2), capture_output=True, text=True, timeout=300,
      check=False)
  assert out.returncode == 1
  assert "needs 3 devices but 2 are available" in out.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


# --- weight files and checkpoints -----------------------------------------------------------

def test_missing_weight_file_names_the_config_key(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no weight file given \(config key "
                                              r"loss.siglip_weights\)"):
    weight_files.check_weight_file("", "loss.siglip_weights")
  missing = str(tmp_path / "siglip2.safetensors")
  with pytest.raises(FileNotFoundError, match=r"siglip2.safetensors' does not exist \(config "
                                              r"key loss.siglip_weights\)"):
    weight_files.read_weight_file(missing, "loss.siglip_weights")
  (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
  with pytest.raises(ValueError, match="unknown format; use .safetensors, .npz or a torch"):
    weight_files.read_weight_file(str(tmp_path / "weights.h5"), "loss.dino_weights")


def test_mismatched_gpt_weights_list_every_problem():
  config = gpt.GPTConfig(vocab_size=16, num_layers=1, dim=16, num_heads=2, num_classes=3,
                         block_size=8, group_size=2, causal_num=2)
  shapes = jax.eval_shape(lambda key: gpt.init_params(config, key), jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  state_dict = gpt_state_dict.gpt_state_dict_from_params(params, config)
  other = gpt.GPTConfig(**dict(config.to_dict(), vocab_size=32))
  with pytest.raises(ValueError, match=r"GPT state dict does not match the config: .*tensor "
                                       r"tok_embeddings.weight has shape \(16, 16\), expected "
                                       r"\(32, 16\) for this config"):
    gpt_state_dict.gpt_params_from_state_dict(state_dict, other)
  del state_dict["norm.weight"]
  state_dict["extra.weight"] = np.zeros(2)
  with pytest.raises(ValueError, match=r"unknown tensors \['extra.weight'\]; missing tensors "
                                       r"\['norm.weight'\]"):
    gpt_state_dict.gpt_params_from_state_dict(state_dict, config)


def test_checkpoint_of_another_config_is_named(tmp_path):
  checkpointer = checkpoints.Checkpointer(tmp_path, keep=2)
  checkpointer.save(2, {"w": jnp.ones((4, 8))}, {"next_index": 2})
  checkpointer.close()
  checkpointer = checkpoints.Checkpointer(tmp_path, keep=2)
  wider = {"w": jax.ShapeDtypeStruct((4, 16), jnp.float32)}
  with pytest.raises(ValueError, match=r"checkpoint step 2 in .*checkpoints does not fit the "
                                       r"train state of this config: .*\(4, 16\).*\(4, 8\)"
                                       r"(.|\n)*give a new --workdir"):
    checkpointer.restore(wider)
  checkpointer.close()


def test_save_interrupted_mid_write_keeps_the_previous_checkpoint(tmp_path):
  script = runs.REPO / "tests" / "scripts" / "interrupted_save.py"
  watcher = runs.start([sys.executable, str(script), str(tmp_path)], runs.cpu_env(1))
  watcher.wait_for("^SAVING 4")
  checkpoints_dir = tmp_path / "checkpoints"
  # Kill while step 4 is being written: its temporary folder exists, the final one does not.
  deadline = time.monotonic() + 120
  while not list(checkpoints_dir.glob("4.*")) and time.monotonic() < deadline:
    time.sleep(0.005)
  watcher.process.send_signal(signal.SIGKILL)
  status, lines = watcher.finish()
  assert status == -signal.SIGKILL and "SAVED 4" not in lines, "the save finished first"
  assert list(checkpoints_dir.glob("4.*")) and not (checkpoints_dir / "4").exists()

  checkpointer = checkpoints.Checkpointer(tmp_path, keep=3)
  assert checkpointer.latest_step() == 2
  target = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
  state, data = checkpointer.restore(target)
  assert int(state["step"]) == 2 and float(state["w"][0, 0]) == 2.0 and data == {"next_index": 2}
  # The next save of that step goes through despite the leftover partial folder.
  assert checkpointer.save(4, {"w": jnp.full((4, 8), 4.0), "step": jnp.asarray(4)}, {})
  checkpointer.wait()
  assert checkpointer.latest_step() == 4
  checkpointer.close()


# --- data -----------------------------------------------------------------------------------

def _jpeg(value, size=40):
  buffer = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def folder_with_truncated_image(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  for label in ("a", "b"):
    (root / "train" / label).mkdir(parents=True)
    for i in range(4):
      (root / "train" / label / f"{i}.jpg").write_bytes(_jpeg(40 * i + (label == "b") * 20))
  # A download cut short: the first half of a JPEG.
  (root / "train" / "a" / "2.jpg").write_bytes(_jpeg(80)[:300])
  return root


def _folder_config(root, skip):
  c = defaults.tokenizer_training_config()
  t = c.tokenizer
  t.image_size, t.num_tokens, t.group_size, t.causal_num, t.min_decoder_size = 32, 16, 4, 4, 8
  t.encoder.patch_size = t.decoder.patch_size = 8
  c.data.source, c.data.folder = "folder", str(root)
  c.data.batch_size, c.data.degrade_prob = 8, 0.0
  c.data.resize_min = c.data.resize_max = 32
  c.data.skip_corrupt_images = skip
  return c


def test_truncated_image_in_a_training_batch(folder_with_truncated_image, caplog):
  root = folder_with_truncated_image
  with caplog.at_level("WARNING"):
    batch = next(pipeline.make_tokenizer_train_iterator(_folder_config(root, skip=True)))
  assert batch["image"].shape == (8, 32, 32, 3)   # the batch stays full
  assert "skipping unreadable image" in caplog.text and "2.jpg" in caplog.text
  strict = pipeline.make_tokenizer_train_iterator(_folder_config(root, skip=False))
  with pytest.raises(ValueError, match=r"cannot read image .*a/2\.jpg: .*\(set "
                                       r"data.skip_corrupt_images=True to skip unreadable files\)"):
    next(strict)


def test_labels_outside_the_class_range():
  from detailflow_jax.data import codes  # pylint: disable=g-import-not-at-top
  gpt_fields = dict(vocab_size=64, block_size=32, group_size=4, causal_num=4, num_classes=10)
  manifest = dict(codebook_size=64, num_tokens=32, group_size=4, causal_num=4, num_classes=1000,
                  tokenizer_workdir="tok")
  with pytest.raises(ValueError, match="gpt.num_classes=10 is smaller than the codes' "
                                       "num_classes=1000; labels would be out of range"):
    codes.check_codes_match_gpt(manifest, gpt_fields)


# --- faults during training -----------------------------------------------------------------

class _CountingData:
  """A data iterator with the loop's get_state/set_state protocol."""

  def __init__(self):
    self.index = 0

  def __next__(self):
    self.index += 1
    return self.index

  def get_state(self):
    return {"next_index": self.index}

  def set_state(self, state):
    self.index = state["next_index"]


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_loss_stops_with_the_last_good_checkpoint_intact(tmp_path, bad_value):
  state = {"w": jnp.zeros((3,)), "step": jnp.zeros((), jnp.int32)}
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

  def step_fn(state, batch, step):
    new = {"w": state["w"] + 1.0, "step": state["step"] + 1}
    return new, {"loss": jnp.float32(bad_value if step == 5 else 1.0 / step)}

  with pytest.raises(loop.NonFiniteLossError) as error:
    loop.run(workdir=str(tmp_path), state=state, abstract_state=abstract, step_fn=step_fn,
             data_iterator=_CountingData(), num_steps=10, log_every=1, checkpoint_every=2,
             keep_checkpoints=5, step_of=lambda s: s["step"])
  message = str(error.value)
  assert message.startswith(f"non-finite loss at step 5: {{'loss': {bad_value}}}")
  assert "Training stopped; the last good checkpoint (step 4)" in message
  assert "is intact" in message
  checkpointer = checkpoints.Checkpointer(tmp_path)
  assert checkpointer.latest_step() == 4
  restored, data = checkpointer.restore(abstract)
  checkpointer.close()
  assert int(restored["step"]) == 4 and float(restored["w"][0]) == 4.0
  assert data == {"next_index": 4}
