"""GPT parity with the official Transformer and generate_group_par (every gpt* parity fixture;
shapes, scales and array names come from its config.json and io.npz)."""
import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, max_relative_error, parity_scale_name
from detailflow_jax import detail, sampling
from detailflow_jax.interop import gpt_state_dict
from detailflow_jax.models import gpt



@pytest.fixture(scope="module", autouse=True)
def full_float32_matmuls():
  """Exact float32 matmuls on accelerators too (their default may use reduced precision)."""
  with jax.default_matmul_precision("highest"):
    yield

@pytest.fixture(scope="module")
def loaded(parity_gpt):
  """(config, params, io) of one parity case."""
  args = gpt_state_dict.gpt_config_from_official_args(parity_gpt.config["reference_model_args"])
  config = gpt.GPTConfig.from_dict(args)
  params = gpt_state_dict.gpt_params_from_state_dict(parity_gpt.state_dict, config)
  return config, params, parity_gpt.io


@pytest.fixture(scope="module")
def forward(loaded):
  config, params, _ = loaded
  return jax.jit(lambda codes, labels: gpt.GPT(config).apply({"params": params}, codes, labels))


def test_training_path_logits(loaded, forward):
  """Every recorded forward: `<name>_idx` codes with their `<name>_logits`."""
  _, _, io = loaded
  cases = sorted(k[:-len("_idx")] for k in io
                 if k.endswith("_idx") and k[:-len("_idx")] + "_logits" in io)
  assert "train" in cases, sorted(io)
  errors = {}
  for case in cases:
    logits = forward(jnp.asarray(io[f"{case}_idx"]), jnp.asarray(io["train_labels"]))
    assert logits.shape == io[f"{case}_logits"].shape, case
    errors[case] = max_relative_error(logits, io[f"{case}_logits"])
  print("training-path logits max relative errors", errors)
  assert max(errors.values()) <= 1e-4, errors


def test_train_loss(loaded, forward):
  _, _, io = loaded
  logits = forward(jnp.asarray(io["train_idx"]), jnp.asarray(io["train_labels"]))
  loss = gpt.next_code_loss(logits, jnp.asarray(io["train_targets"]))
  assert abs(float(loss) - float(io["train_loss"])) <= 1e-4 * abs(float(io["train_loss"]))


def test_mask_and_rotary_tables(loaded):
  config, _, io = loaded
  mask = detail.gpt_attention_mask(config.block_size, config.group_size, config.causal_num)
  np.testing.assert_array_equal(mask, io["group_causal_mask"])
  table = gpt.rotary_table(config.block_size, config.group_size, config.head_dim, config.rope_base)
  assert table.shape == io["freqs_cis"].shape
  np.testing.assert_allclose(table, io["freqs_cis"], rtol=0, atol=1e-6)


def test_sequence_length_matches_reference_calls(loaded, parity_gpt):
  config, _, _ = loaded
  calls = parity_gpt.config["checks"]["greedy_call_seq_lengths"]
  prefix_sizes = list(range(config.causal_num)) + list(
      range(config.causal_num, config.block_size, config.group_size))
  assert [gpt.sequence_length(n, config) for n in prefix_sizes] == calls


def gradual_variant(parity_gpt):
  """config.greedy.gradual_cfg_variant, or a skip when this fixture records no gradual decode."""
  variant = parity_gpt.config["greedy"].get("gradual_cfg_variant")
  if variant is None:
    pytest.skip(f"{parity_gpt.folder} records no gradual_cfg decode")
  return variant


def _greedy(loaded, parity_gpt, cfg_scale, gradual):
  config, params, io = loaded
  return sampling.generate_codes_with_logits(
      params, config, io["gen_labels"], rng=jax.random.PRNGKey(0), cfg_scale=cfg_scale,
      top_k=parity_gpt.config["greedy"]["top_k"], gradual_cfg=gradual)


def test_greedy_group_parallel_decoding(loaded, parity_gpt):
  _, _, io = loaded
  scale = parity_gpt.config["greedy"]["cfg_scale"]
  name = f"greedy_cfg{parity_scale_name(scale)}"
  codes, cond, uncond = _greedy(loaded, parity_gpt, scale, False)
  np.testing.assert_array_equal(np.asarray(codes), io[f"{name}_tokens"])
  assert max_relative_error(cond, io[f"{name}_logits_cond"]) <= 1e-4
  assert max_relative_error(uncond, io[f"{name}_logits_uncond"]) <= 1e-4


def test_greedy_gradual_cfg_decoding(loaded, parity_gpt):
  _, _, io = loaded
  scale = gradual_variant(parity_gpt)["cfg_scale"]
  codes, _, _ = _greedy(loaded, parity_gpt, scale, True)
  name = f"greedy_gradualcfg{parity_scale_name(scale)}_tokens"
  np.testing.assert_array_equal(np.asarray(codes), io[name])


def test_gradual_scales_match_reference(loaded, parity_gpt):
  config, _, _ = loaded
  scale = gradual_variant(parity_gpt)["cfg_scale"]
  expected = parity_gpt.config["checks"]["gradualcfg_scales_per_position"]
  scales = [scale] * config.causal_num + [
      sampling.gradual_cfg_scale(scale, k // config.group_size, config)
      for k in range(config.causal_num, config.block_size)]
  np.testing.assert_allclose(scales, expected, rtol=1e-12)


def test_state_dict_round_trip_is_exact(loaded, parity_gpt):
  config, params, _ = loaded
  exported = gpt_state_dict.gpt_state_dict_from_params(params, config)
  assert set(exported) == set(parity_gpt.state_dict)
  for key, value in parity_gpt.state_dict.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_inferred_config_agrees(loaded, parity_gpt):
  config, _, _ = loaded
  inferred = gpt_state_dict.infer_gpt_config(parity_gpt.state_dict)
  for key, value in inferred.items():
    assert getattr(config, key) == value, key


def test_state_dict_errors_name_the_tensors(loaded, parity_gpt):
  config, _, _ = loaded
  sd = dict(parity_gpt.state_dict)
  last = f"layers.{config.num_layers - 1}.ffn_norm.weight"
  sd.pop(last)
  sd["layers.0.attention.wo.weight"] = sd["layers.0.attention.wo.weight"][:, :-1]
  sd["freqs_cis"] = np.zeros(3)
  with pytest.raises(ValueError) as info:
    gpt_state_dict.gpt_params_from_state_dict(sd, config)
  message = str(info.value)
  for name in (last, "layers.0.attention.wo.weight", "freqs_cis"):
    assert name in message


@pytest.mark.parametrize("size", ["B", "L", "XL", "XXL"])
def test_size_configs(size):
  """configs/ar_<size>.py builds the LlamaGen size with the official SwiGLU width."""
  spec = importlib.util.spec_from_file_location("ar_config", REPO_ROOT / "configs" / f"ar_{size.lower()}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = gpt.GPTConfig.from_dict(module.get_config().gpt)
  assert dataclasses.replace(config, dtype="float32") == gpt.gpt_model_config(size)
  widths = {"B": 2048, "L": 2816, "XL": 3584, "XXL": 4096}
  assert (config.ffn_hidden, config.block_size, config.group_size, config.causal_num) == (
      widths[size], 128, 8, 8)
  assert gpt.GPTConfig.from_dict(module.get_config("256").gpt).block_size == 256
