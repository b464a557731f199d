"""Grain pipelines: batch contents, per-batch draws, determinism, resumable state, sharding,
eval."""
import json

import numpy as np
import pytest
from fake_fashion_mnist import write_fake_fashion_mnist

from detailflow_jax.config import defaults
from detailflow_jax import detail
from detailflow_jax.data import degrade
from detailflow_jax.data import pipeline
from detailflow_jax.data import transforms

NUM_TRAIN, NUM_TEST = 40, 10


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fmnist")
  write_fake_fashion_mnist(directory, num_train=NUM_TRAIN, num_test=NUM_TEST)
  c = defaults.tokenizer_training_config()
  t = c.tokenizer
  t.image_size, t.num_tokens, t.group_size, t.causal_num, t.min_decoder_size = 32, 16, 4, 4, 8
  t.encoder.patch_size = t.decoder.patch_size = 8
  c.data.fashion_mnist_dir = str(directory)
  c.data.batch_size = 8
  c.data.resize_min = c.data.resize_max = 32
  c.data.degrade_prob = 0.5
  return c


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def first_batches(config):
  return take(pipeline.make_tokenizer_train_iterator(config), 12)


def test_batch_contents(config, first_batches):
  schedule = detail.resolution_schedule(config.tokenizer)
  seen = set()
  for batch in first_batches:
    n, noise = int(batch["num_tokens"]), int(batch["noise_position"])
    seen.add(n == schedule.num_tokens)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["num_tokens"].dtype == np.int32 and batch["num_tokens"].shape == ()
    assert batch["noise_position"].dtype == np.int32
    assert n in schedule.token_list and -1 <= noise < max(n - 1, 1)
    side = schedule.decoder_size(n)
    assert batch["target"].shape == (8, side, side, 3)
    if n == schedule.num_tokens:
      np.testing.assert_array_equal(batch["target"], batch["image"])
    else:
      expected = degrade.degraded_target(batch["image"], schedule.content_resolution(n), side)
      np.testing.assert_allclose(batch["target"], expected, atol=1e-6)
  assert seen == {True, False}  # both branches within 12 batches at degrade_prob 0.5


def test_images_are_flipped_records(config, first_batches):
  # Fashion-MNIST at 32 px: no resize, so each image is a record or its mirror image.
  from detailflow_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  source = fashion_mnist.FashionMNISTSource(config.data.fashion_mnist_dir, "train")
  records = {transforms.to_float_image(source[i]["image"]).tobytes(): source[i]["label"]
             for i in range(len(source))}
  for image, label in zip(first_batches[0]["image"], first_batches[0]["label"]):
    key = image.tobytes() if image.tobytes() in records else image[:, ::-1].copy().tobytes()
    assert records[key] == label
  # The first 5 batches are one epoch (40 records): every record exactly once.
  labels = np.concatenate([b["label"] for b in first_batches[:5]])
  np.testing.assert_array_equal(np.sort(labels), np.sort(np.arange(NUM_TRAIN) % 10))


def test_same_seed_same_stream_other_seed_differs(config, first_batches):
  assert_same_batches(take(pipeline.make_tokenizer_train_iterator(config), 12), first_batches)
  other = config.copy_and_resolve_references()
  other.seed = config.seed + 1
  different = take(pipeline.make_tokenizer_train_iterator(other), 3)
  assert not np.array_equal(different[0]["image"], first_batches[0]["image"])


def test_state_roundtrip_resumes_stream(config, first_batches):
  iterator = pipeline.make_tokenizer_train_iterator(config)
  take(iterator, 7)
  state = json.loads(json.dumps(iterator.get_state()))  # what the checkpoint stores
  resumed = pipeline.make_tokenizer_train_iterator(config)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 5), first_batches[7:12])


def test_draws_shared_by_processes_and_shards_disjoint(config, first_batches):
  shards = [take(pipeline.make_tokenizer_train_iterator(config, process_index=i,
                                                        process_count=2), 5)
            for i in range(2)]
  for a, b in zip(*shards):
    assert a["image"].shape[0] == 4
    assert int(a["num_tokens"]) == int(b["num_tokens"])
    assert int(a["noise_position"]) == int(b["noise_position"])
    assert a["target"].shape == b["target"].shape
  # Process p holds rows [4p, 4p + 4) of the single-process global batch: the global batches
  # (and so the losses) do not depend on the process count.
  for t, whole in enumerate(first_batches[:5]):
    for key in ("image", "target", "label"):
      joined = np.concatenate([shards[0][t][key], shards[1][t][key]])
      np.testing.assert_array_equal(joined, whole[key], err_msg=key)


def test_draw_frequencies(config):
  schedule = detail.resolution_schedule(config.tokenizer)
  draw = pipeline.DegradeBatch(schedule, seed=0, degrade_prob=0.2, correction_prob=1.0).draw
  draws = [draw(i) for i in range(5000)]
  full = np.mean([n == 16 for n, _ in draws])
  assert abs(full - 0.8) < 0.02
  assert all(q == -1 for n, q in draws if n == 1)
  assert all(q < n - 4 for n, q in draws if n > 4)  # the last group is never noised


def test_pipeline_errors(config):
  bad = config.copy_and_resolve_references()
  bad.data.batch_size = 6
  with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of "
                                       "process_count=4"):
    pipeline.make_tokenizer_train_iterator(bad, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
    pipeline.make_tokenizer_train_iterator(config, process_index=2, process_count=2)
  bad = config.copy_and_resolve_references()
  bad.data.degrade_prob = 1.2
  with pytest.raises(ValueError, match=r"data.degrade_prob=1.2 must be in \[0, 1\]"):
    pipeline.make_tokenizer_train_iterator(bad)
  bad = config.copy_and_resolve_references()
  bad.data.resize_min = 24
  with pytest.raises(ValueError, match="image_size <= data.resize_min"):
    pipeline.make_tokenizer_train_iterator(bad)


def test_eval_iterator_padded_and_complete(config):
  from detailflow_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  source = fashion_mnist.FashionMNISTSource(config.data.fashion_mnist_dir, "test")
  seen = []
  for process in range(2):
    batches = list(pipeline.make_eval_iterator(config, "test", 4, process_index=process,
                                               process_count=2))
    assert len(batches) == pipeline.eval_num_batches(NUM_TEST, 4, 2) == 3  # 5 records, 2 each
    for batch in batches:
      assert batch["image"].shape == (2, 32, 32, 3) and batch["mask"].dtype == bool
      for image, label, valid, index in zip(batch["image"], batch["label"], batch["mask"],
                                            batch["index"]):
        if valid:
          np.testing.assert_array_equal(image, transforms.to_float_image(source[index]["image"]))
          assert label == source[index]["label"]
          seen.append(int(index))
        else:
          assert index == -1 and not image.any()
  assert sorted(seen) == list(range(NUM_TEST))
  again = list(pipeline.make_eval_iterator(config, "test", 4))
  assert_same_batches(again, list(pipeline.make_eval_iterator(config, "test", 4)))
  assert len(again) == 3 and int(again[-1]["mask"].sum()) == 2
