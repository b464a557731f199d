"""A small CNN trained on Fashion-MNIST to judge class-conditional samples.

It answers one question honestly: does a sample of class c look like class c to a classifier
that never saw generated images? Trained on the train split (padded to 32x32 RGB like the
tokenizer's inputs), reported on the test split. Its penultimate layer (128-d, `features`) is
also the feature space of the classifier Frechet distance (eval/classifier_fd.py).
"""
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from detailflow_jax import preemption

FEATURE_DIM = 128
BATCH_SIZE = 500  # images per compiled call of predict / features


class JudgeCNN(nn.Module):
  """Strided convolutions: about 4 MFLOP per image, so three epochs of the 60k training images
  take about a minute on two CPU cores (stride-1 VGG-style blocks cost 12x more)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False, return_features=False):
    """Logits; with return_features, (logits, the 128-d Dense+ReLU output before the last Dense)."""
    x = jnp.mean(x, axis=-1, keepdims=True)  # grey: samples and data are grey RGB
    x = nn.relu(nn.Conv(32, (5, 5), strides=(2, 2))(x))   # 16 x 16
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))   # 8 x 8
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(FEATURE_DIM)(x))
    logits = nn.Dense(self.num_classes)(nn.Dropout(0.3, deterministic=not train)(features))
    return (logits, features) if return_features else logits


def _to_float(images_uint8):
  return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


def train_judge(train_images, train_labels, *, epochs=3, batch_size=128, seed=0, log=None):
  """Trains on uint8 NHWC images; returns params. `log` gets one line per epoch (default: print,
  flushed, so progress shows when stdout is a file)."""
  log = log or functools.partial(print, flush=True)
  model = JudgeCNN()
  rng = jax.random.PRNGKey(seed)
  params = model.init(rng, jnp.zeros((1,) + train_images.shape[1:], jnp.float32))["params"]
  # At least one step: a split smaller than a batch (test data) trains on all of it at once.
  steps_per_epoch = max(1, len(train_images) // batch_size)
  schedule = optax.cosine_decay_schedule(2e-3, epochs * steps_per_epoch)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, key):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  order_rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for epoch in range(epochs):
    order = order_rng.permutation(len(train_images))
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      rng, key = jax.random.split(rng)
      params, opt_state, loss = step(params, opt_state, _to_float(train_images[idx]),
                                     jnp.asarray(train_labels[idx]), key)
    log(f"judge epoch {epoch + 1}/{epochs}: loss {float(loss):.4f} "
        f"({time.perf_counter() - start:.0f} s)")
    if epoch + 1 < epochs and preemption.reached("judge_epoch"):
      raise preemption.Preempted(f"SIGTERM: stopped training the judge after epoch {epoch + 1} "
                                 f"of {epochs}; run the same command to train it again.")
  return params


@jax.jit
def _logits_and_features(params, x):
  return JudgeCNN().apply({"params": params}, x, return_features=True)


def predict_and_features(params, images_uint8, batch_size=BATCH_SIZE):
  """(predicted classes [N] int, features [N, 128] float32) of uint8 NHWC images (any count),
  in batches of one compiled shape (the last batch padded, the padding dropped)."""
  preds, feature_chunks = [], []
  for i in range(0, len(images_uint8), batch_size):
    chunk = _to_float(images_uint8[i:i + batch_size])
    count = len(chunk)
    if count < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - count,) + chunk.shape[1:], np.float32)])
    logits, feats = _logits_and_features(params, chunk)
    preds.append(np.asarray(jnp.argmax(logits, -1))[:count])
    feature_chunks.append(np.asarray(feats, np.float32)[:count])
  if not preds:
    return np.zeros((0,), np.int64), np.zeros((0, FEATURE_DIM), np.float32)
  return np.concatenate(preds), np.concatenate(feature_chunks)


def features(params, images_uint8, batch_size=BATCH_SIZE):
  """The judge's penultimate-layer features [N, 128] float32 of uint8 NHWC images."""
  return predict_and_features(params, images_uint8, batch_size)[1]


def predict(params, images_uint8, batch_size=BATCH_SIZE):
  """Predicted classes for uint8 NHWC images (any count)."""
  return predict_and_features(params, images_uint8, batch_size)[0]


def accuracy(params, images_uint8, labels):
  return float(np.mean(predict(params, images_uint8) == np.asarray(labels)))
