"""linear.dense_dot_general: a dense layer's product with a reordered weight gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.models import linear

DENSE = (((2,), (0,)), ((), ()))


def _grads(dot_general, x, w, dtype, preferred):
  loss = lambda x, w: (dot_general(x.astype(dtype), w.astype(dtype), DENSE,
                                   preferred_element_type=preferred).astype(jnp.float32) ** 2).sum()
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


@pytest.fixture(scope="module")
def operands():
  key = jax.random.PRNGKey(0)
  return (jax.random.normal(key, (4, 5, 6)), jax.random.normal(jax.random.fold_in(key, 1), (6, 3)))


def test_float32_forward_and_gradients_match_autodiff(operands):
  x, w = operands
  np.testing.assert_array_equal(np.asarray(linear.dense_dot_general(x, w, DENSE)),
                                np.asarray(jax.lax.dot_general(x, w, DENSE)))
  ours = _grads(linear.dense_dot_general, x, w, jnp.float32, None)
  theirs = _grads(jax.lax.dot_general, x, w, jnp.float32, None)
  for a, b in zip(ours, theirs):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_bfloat16_gradients_within_bfloat16_precision(operands):
  """bfloat16 operands summed in float32 (the GPT's projections below float32): the
  cotangent enters both products in bfloat16, so the gradients agree to bfloat16's ~0.4%."""
  x, w = operands
  ours = _grads(linear.dense_dot_general, x, w, jnp.bfloat16, jnp.float32)
  theirs = _grads(jax.lax.dot_general, x, w, jnp.bfloat16, jnp.float32)
  for a, b in zip(ours, theirs):
    error = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    assert error <= 2e-2, error


def test_other_products_go_to_lax(operands):
  x, w = operands
  batched = (((2,), (1,)), ((0,), (0,)))
  y = jax.random.normal(jax.random.PRNGKey(2), (4, 6, 7))
  np.testing.assert_array_equal(np.asarray(linear.dense_dot_general(x, y, batched)),
                                np.asarray(jax.lax.dot_general(x, y, batched)))
  transposed = (((2,), (1,)), ((), ()))
  np.testing.assert_array_equal(np.asarray(linear.dense_dot_general(x, w.T, transposed)),
                                np.asarray(jax.lax.dot_general(x, w.T, transposed)))
