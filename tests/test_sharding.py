"""train/sharding.py: the rules table applied to the models' logical axes, and the mesh."""
import logging

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from detailflow_jax.config import defaults
from detailflow_jax.models import gpt
from detailflow_jax.models import partitioning
from detailflow_jax.train import sharding

MESH = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
TINY = gpt.GPTConfig(vocab_size=63, num_layers=1, dim=64, num_heads=4, num_classes=10,
                     block_size=16, group_size=4, causal_num=4)


def specs(config, mesh=MESH):
  params = jax.eval_shape(lambda: gpt.init_params(config, jax.random.PRNGKey(0)))
  shardings = sharding.state_shardings(params, mesh, gpt.param_logical_axes(config))
  return jax.tree_util.tree_map(lambda s: s.spec, shardings)


def test_gpt_params_are_megatron_sharded(caplog):
  with caplog.at_level(logging.INFO):
    s = specs(TINY)
  layer = s["layers_0"]
  assert layer["attention"]["wo"]["kernel"] == P("tensor", "fsdp")          # row-parallel
  assert layer["feed_forward"]["w1"]["kernel"] == P("fsdp", "tensor")       # column-parallel
  assert layer["feed_forward"]["w3"]["kernel"] == P("fsdp", "tensor")
  assert layer["feed_forward"]["w2"]["kernel"] == P("tensor", "fsdp")       # row-parallel
  # The fused official qkv layout cannot split heads: FSDP only (models/gpt.py QKVProjection).
  assert layer["attention"]["wqkv"]["kernel"] == P("fsdp", None)
  assert layer["attention_norm"]["scale"] == P(None)
  assert s["output"]["kernel"] == P("fsdp", None)    # vocab 63 is odd: replicated, with a note
  assert s["tok_embeddings"]["embedding"] == P(None, "fsdp")
  assert s["cls_embedding"]["embedding"] == P(None, "fsdp")
  notes = [r.getMessage() for r in caplog.records if "not divisible" in r.getMessage()]
  assert notes == [
      "sharding: output/kernel dimension 1 (vocab, size 63) is not divisible by mesh axes "
      "('tensor',) (size 2); kept replicated",
      "sharding: tok_embeddings/embedding dimension 0 (vocab, size 63) is not divisible by "
      "mesh axes ('tensor',) (size 2); kept replicated"]


def test_optimizer_moments_follow_their_params():
  params = {"layers_0": {"feed_forward": {"w2": {"kernel": jnp.zeros((4, 6))}}}}
  axes = {"layers_0": {"feed_forward": {"w2": {"kernel": P("mlp", "embed")}}}}
  state = {"params": params, "opt_state": ({"mu": params, "count": jnp.zeros(())},),
           "rng": jnp.zeros((2,), jnp.uint32)}
  out = jax.tree_util.tree_map(lambda s: s.spec, sharding.state_shardings(state, MESH, axes))
  kernel = ("layers_0", "feed_forward", "w2", "kernel")
  get = lambda tree: tree["layers_0"]["feed_forward"]["w2"]["kernel"]
  assert get(out["params"]) == get(out["opt_state"][0]["mu"]) == P("tensor", "fsdp"), kernel
  assert out["opt_state"][0]["count"] == P() and out["rng"] == P()


def test_constrain_is_a_no_op_without_mesh_and_rules():
  x = jnp.ones((4, 8, 16))
  assert partitioning.constrain(x, partitioning.BLE) is x
  assert partitioning.mesh_axes_for(("activation_batch", "activation_heads"), (6, 3),
                                    {"data": 2, "fsdp": 2, "tensor": 2},
                                    sharding.LOGICAL_AXIS_RULES) == P(None, None)
  assert partitioning.mesh_axes_for(("activation_batch", "activation_heads"), (8, 4),
                                    {"data": 2, "fsdp": 2, "tensor": 2},
                                    sharding.LOGICAL_AXIS_RULES) == P(("data", "fsdp"), "tensor")


def test_mesh_has_auto_axes_and_dcn_needs_several_granules():
  config = defaults.mesh_config()
  mesh = sharding.build_mesh(config)
  assert mesh.axis_names == sharding.MESH_AXES
  assert mesh.axis_types == (AxisType.Auto,) * 3
  with pytest.raises(ValueError, match=r"is not divisible by mesh.dcn_\*"):
    sharding.build_mesh(dict(config, data=-1, dcn_fsdp=2))
  config.dcn_data = len(jax.devices()) + 1
  with pytest.raises(ValueError, match="not divisible|must multiply"):
    sharding.build_mesh(config)
