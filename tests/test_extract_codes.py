"""Code extraction (jobs/extract_codes.py), workdir loading (workdir_io.py) and the AR
code pipeline (data/codes.py)."""
import json
import os
import pathlib
import shutil
import stat

import jax
import numpy as np
import pytest

from detailflow_jax import detail
from detailflow_jax import workdir_io
from detailflow_jax.config.files import load_config_file
from detailflow_jax.data import codes
from detailflow_jax.data import fashion_mnist
from detailflow_jax.data import transforms
from detailflow_jax.jobs import extract_codes
from detailflow_jax.models import tokenizer as tokenizer_model
from detailflow_jax.train import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_TRAIN = 40  # shards of 16, 16, 8 images with the smoke config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A fake Fashion-MNIST folder, a random tiny tokenizer workdir, and one extraction."""
  import fake_fashion_mnist  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("extract")
  fmnist = root / "fmnist"
  fmnist.mkdir()
  fake_fashion_mnist.write_fake_fashion_mnist(fmnist, num_train=NUM_TRAIN, num_test=8)
  tok_config = load_config_file(str(REPO / "configs" / "tokenizer_tiny.py") + ":smoke")
  params = tokenizer_model.init_params(tok_config.tokenizer, jax.random.PRNGKey(0))
  tok_dir = root / "tokenizer"
  ckpt = checkpoints.Checkpointer(tok_dir)
  ckpt.save(3, {"step": np.int32(3), "params": {"tokenizer": params}, "ema_params": {}}, {})
  ckpt.close()
  workdir_io.save_workdir_config(tok_config, tok_dir)

  config = ar_config(tok_dir, fmnist, root / "codes")
  summary = extract_codes.extract_codes(config, str(root / "work"))
  return dict(root=root, fmnist=fmnist, tok_dir=tok_dir, tok_config=tok_config.tokenizer,
              params=jax.device_get(params), config=config, summary=summary,
              codes_dir=root / "codes")


def ar_config(tok_dir, fmnist, codes_dir):
  config = load_config_file(str(REPO / "configs" / "ar_tiny.py") + ":smoke")
  config.extract.tokenizer_workdir = str(tok_dir)
  config.data.fashion_mnist_dir = str(fmnist)
  config.data.codes_dir = str(codes_dir)
  return config


def load_shard(codes_dir, index):
  names = codes.shard_file_names(index)
  return tuple(np.load(pathlib.Path(codes_dir) / names[k])
               for k in ("codes", "labels", "noise_positions"))


def test_manifest_shapes_and_labels(setup):
  manifest = codes.read_manifest(setup["codes_dir"])
  assert setup["summary"]["shards_written"] == [0, 1, 2]
  assert manifest["num_images"] == NUM_TRAIN and manifest["views"] == 2
  assert manifest["view_names"] == ["center", "center_flip"]
  assert (manifest["num_tokens"], manifest["group_size"], manifest["causal_num"]) == (32, 4, 4)
  assert manifest["codebook_size"] == 64 and manifest["num_classes"] == 10
  assert [s["count"] for s in manifest["shards"]] == [16, 16, 8]
  assert manifest["tokenizer_step"] == 3 and manifest["tokenizer"]["num_tokens"] == 32
  for index, count in enumerate([16, 16, 8]):
    shard_codes, labels, noise = load_shard(setup["codes_dir"], index)
    assert shard_codes.shape == (count, 2, 3, 32) and shard_codes.dtype == np.int16
    np.testing.assert_array_equal(labels, (np.arange(count) + 16 * index) % 10)
    assert noise.shape == (count,)
    assert shard_codes.min() >= 0 and shard_codes.max() < 64
  # Atomic writes keep the usual permissions (a temporary file alone would be private).
  umask = os.umask(0)
  os.umask(umask)
  for name in ("manifest.json", "codes_00000.npy"):
    assert stat.S_IMODE((setup["codes_dir"] / name).stat().st_mode) == 0o666 & ~umask
  # The job saved its config beside its outputs.
  saved = workdir_io.load_workdir_config(setup["root"] / "work")
  assert saved.job == "train_ar" and saved.extract.tokenizer_workdir == str(setup["tok_dir"])


def test_clean_codes_equal_encode_of_the_image_and_its_flip(setup):
  source = fashion_mnist.FashionMNISTSource(setup["fmnist"], "train")
  images = np.stack([transforms.to_float_image(source[i]["image"]) for i in range(16)])
  model = tokenizer_model.DetailFlowTokenizer(setup["tok_config"])
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode)["indices"])
  shard_codes, _, _ = load_shard(setup["codes_dir"], 0)
  np.testing.assert_array_equal(shard_codes[:, 0, codes.CLEAN],
                                encode(setup["params"], images))
  np.testing.assert_array_equal(shard_codes[:, 1, codes.CLEAN],
                                encode(setup["params"], images[:, :, ::-1]))


def test_triplet_invariants_and_noise_positions(setup):
  schedule = detail.resolution_schedule(setup["tok_config"])
  c, g = schedule.causal_num, schedule.group_size
  noised = corrected = 0
  for index in range(3):
    shard_codes, _, noise = load_shard(setup["codes_dir"], index)
    for row, (triplets, q) in enumerate(zip(shard_codes, noise)):
      assert q == extract_codes.noise_position(setup["config"].seed, 16 * index + row, schedule)
      end = detail.noise_span_end(int(q), g, c)
      assert end <= 32 - g  # the last group is never noised
      for clean, noisy_input, label in triplets:  # every view shares the image's position
        np.testing.assert_array_equal(label[:end], clean[:end])
        np.testing.assert_array_equal(noisy_input[:q], clean[:q])
        np.testing.assert_array_equal(noisy_input[end:], label[end:])
        noised += int(np.any(noisy_input[q:end] != clean[q:end]))
        corrected += int(np.any(label[end:] != clean[end:]))
  # The top-50 draw and the re-encode change codes for most images (a random tokenizer).
  assert noised > NUM_TRAIN and corrected > NUM_TRAIN


def test_resume_skips_finished_shards(setup, tmp_path):
  codes_dir = tmp_path / "codes"
  shutil.copytree(setup["codes_dir"], codes_dir)
  original = load_shard(codes_dir, 1)
  (codes_dir / codes.shard_file_names(1)["codes"]).unlink()
  (codes_dir / ".codes_00001.npy.x.tmp").write_bytes(b"left by a killed run")
  kept = (codes_dir / codes.shard_file_names(0)["codes"]).stat().st_mtime_ns
  with pytest.raises(ValueError, match="incomplete: 1 of 3 shards missing"):
    codes.CodesSource(codes_dir)
  config = ar_config(setup["tok_dir"], setup["fmnist"], codes_dir)
  summary = extract_codes.extract_codes(config, str(tmp_path / "work"))
  assert summary["shards_written"] == [1] and summary["shards_skipped"] == [0, 2]
  assert (codes_dir / codes.shard_file_names(0)["codes"]).stat().st_mtime_ns == kept
  for before, after in zip(original, load_shard(codes_dir, 1)):
    np.testing.assert_array_equal(before, after)
  assert not list(codes_dir.glob(".*.tmp"))
  assert len(codes.CodesSource(codes_dir)) == NUM_TRAIN


def test_processes_split_the_shards(setup, tmp_path):
  config = ar_config(setup["tok_dir"], setup["fmnist"], tmp_path / "codes")
  second = extract_codes.extract_codes(config, str(tmp_path / "w1"), process_index=1,
                                       process_count=2)
  assert second["shards_written"] == [1]
  first = extract_codes.extract_codes(config, str(tmp_path / "w0"), process_index=0,
                                      process_count=2)
  assert first["shards_written"] == [0, 2]
  for index in range(3):
    for a, b in zip(load_shard(setup["codes_dir"], index), load_shard(tmp_path / "codes", index)):
      np.testing.assert_array_equal(a, b)


def test_resume_with_other_settings_is_refused(setup, tmp_path):
  codes_dir = tmp_path / "codes"
  shutil.copytree(setup["codes_dir"], codes_dir)
  config = ar_config(setup["tok_dir"], setup["fmnist"], codes_dir)
  config.seed = 123
  with pytest.raises(ValueError, match=r"different extraction \(differs in \['seed'\]\)"):
    extract_codes.extract_codes(config, str(tmp_path / "work"))


def test_codes_of_another_tokenizer_checkpoint_are_extracted_again(setup, tmp_path, capsys):
  """A folder whose manifest names another tokenizer step (codes from a half-trained tokenizer,
  say) is replaced by itself, never a dead end."""
  codes_dir = tmp_path / "codes"
  shutil.copytree(setup["codes_dir"], codes_dir)
  manifest_path = codes_dir / codes.MANIFEST_FILE
  stale = json.loads(manifest_path.read_text())
  stale["tokenizer_step"] = 1
  manifest_path.write_text(json.dumps(stale))
  np.save(codes_dir / codes.shard_file_names(2)["codes"], np.zeros((1,), np.int64))  # not these
  config = ar_config(setup["tok_dir"], setup["fmnist"], codes_dir)
  summary = extract_codes.extract_codes(config, str(tmp_path / "work"))
  assert "come from tokenizer step 1, the tokenizer is now at step 3" in capsys.readouterr().out
  assert summary["replaced_stale_codes"] and summary["shards_written"] == [0, 1, 2]
  assert codes.read_manifest(codes_dir)["tokenizer_step"] == 3
  for index in range(3):
    for a, b in zip(load_shard(setup["codes_dir"], index), load_shard(codes_dir, index)):
      np.testing.assert_array_equal(a, b)
  again = extract_codes.extract_codes(config, str(tmp_path / "work"))
  assert not again["replaced_stale_codes"] and again["shards_skipped"] == [0, 1, 2]


def test_ten_crop_views():
  image = np.arange(7 * 7 * 3, dtype=np.uint8).reshape(7, 7, 3)
  views = extract_codes.make_views(image, 5, flips=True, ten_crop=True)
  assert views.shape == (10, 5, 5, 3)
  names = extract_codes.view_names(True, True)
  assert names[4] == "center" and names[9] == "center_flip"
  np.testing.assert_array_equal(views[0], image[:5, :5])      # top left
  np.testing.assert_array_equal(views[3], image[2:, 2:])      # bottom right
  np.testing.assert_array_equal(views[4], image[1:6, 1:6])    # center
  np.testing.assert_array_equal(views[5], image[:, ::-1][:5, :5])  # top left of the mirror
  single = extract_codes.make_views(image[:5, :5], 5, flips=False, ten_crop=False)
  assert single.shape == (1, 5, 5, 3)


def test_load_tokenizer_and_its_errors(setup, tmp_path):
  loaded = workdir_io.load_tokenizer(setup["tok_dir"])
  assert loaded.step == 3 and loaded.config.num_tokens == 32
  for a, b in zip(jax.tree_util.tree_leaves(loaded.params),
                  jax.tree_util.tree_leaves(setup["params"])):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="no EMA weights"):
    workdir_io.load_tokenizer(setup["tok_dir"], use_ema=True)
  with pytest.raises(ValueError, match=r"step=5 has no checkpoint .* available steps: \[3\]"):
    workdir_io.load_tokenizer(setup["tok_dir"], step=5)
  with pytest.raises(ValueError, match="config.json not found"):
    workdir_io.load_tokenizer(tmp_path)


def test_ar_samples_follow_the_reference_sequences(setup):
  element = codes.CodesSource(setup["codes_dir"])[5]
  triplets = element["codes"].astype(np.int32)
  seen = {True: 0, False: 0}
  for seed in range(40):
    sample = codes.ChooseSequence(4, 0.3).random_map(element, np.random.default_rng(seed))
    corrected = bool(sample["corrected"])
    seen[corrected] += 1
    source, target = (codes.INPUT, codes.LABEL) if corrected else (codes.CLEAN, codes.CLEAN)
    matches = [np.array_equal(sample["codes_input"], t[source, :28]) and
               np.array_equal(sample["targets"], t[target]) for t in triplets]
    assert any(matches) and sample["labels"] == 5
  assert seen[True] and seen[False]


def test_ar_iterator_is_deterministic_and_resumable(setup):
  config = ar_config(setup["tok_dir"], setup["fmnist"], setup["codes_dir"])
  config.data.correction_prob = 0.5
  first = codes.make_ar_train_iterator(config)
  batches = [next(first) for _ in range(6)]  # past one epoch of 40 records at batch 8
  assert batches[0]["codes_input"].shape == (8, 28) and batches[0]["targets"].shape == (8, 32)
  assert batches[0]["codes_input"].dtype == np.int32 and batches[0]["labels"].dtype == np.int32
  fraction = np.mean([b["corrected"].mean() for b in batches])
  assert 0.2 < fraction < 0.8
  second = codes.make_ar_train_iterator(config)
  next(second)
  state = json.loads(json.dumps(second.get_state()))
  third = codes.make_ar_train_iterator(config)
  third.set_state(state)
  for expected in batches[1:]:
    got = next(third)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  # Processes read disjoint records.
  config.data.batch_size = 4
  labels = [next(codes.make_ar_train_iterator(config, p, 2))["labels"] for p in range(2)]
  assert set(labels[0] % 2) == {0} and set(labels[1] % 2) == {1}  # record i has label i % 10
