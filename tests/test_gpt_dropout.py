"""GPTConfig.dropout_bits: PackedDropout keeps the configured fraction with nn.Dropout's scaling,
and 32 bits is flax's nn.Dropout itself."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.models import gpt


@pytest.mark.parametrize("bits", [8, 16])
def test_packed_dropout_rate_and_scale(bits):
  x = jnp.ones((64, 127, 33), jnp.float32)  # a size that is not a multiple of 32 // bits
  out = gpt.PackedDropout(0.1, bits).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
  kept = np.asarray(out) != 0
  assert abs(kept.mean() - 0.9) < 0.005
  np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.9, rtol=1e-6)
  again = gpt.PackedDropout(0.1, bits).apply({}, x, True)
  np.testing.assert_array_equal(again, x)


def test_thirty_two_bits_is_flax_dropout():
  assert isinstance(gpt._dropout(0.1, 32), nn.Dropout)  # pylint: disable=protected-access


def test_gpt_trains_with_packed_dropout():
  config = gpt.GPTConfig(vocab_size=64, num_layers=1, dim=32, num_heads=2, num_classes=10,
                         block_size=16, group_size=4, causal_num=4, dropout_bits=8)
  params = gpt.init_params(config, jax.random.PRNGKey(0))
  codes = jnp.zeros((2, 12), jnp.int32)
  labels = jnp.array([1, 2], jnp.int32)
  model = gpt.GPT(config)
  train = model.apply({"params": params}, codes, labels, train=True,
                      rngs={"dropout": jax.random.PRNGKey(1)})
  assert train.shape == (2, 16, 64) and np.all(np.isfinite(np.asarray(train)))
  with pytest.raises(ValueError, match="dropout_bits"):
    gpt.GPTConfig(dropout_bits=4)
