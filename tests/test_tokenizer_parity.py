"""DetailFlowTokenizer against the official PyTorch outputs of a tiny random model, and the
state-dict converter that loads it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.config import defaults
from detailflow_jax import detail
from detailflow_jax.interop import tokenizer_state_dict as sd_lib
from detailflow_jax.models import tokenizer as tokenizer_lib
from tests.conftest import max_relative_error, parity_params

TOLERANCE = 1e-4
# Full float32 matmuls, so the parity bounds also hold on accelerators (whose default is lower).
HIGHEST = jax.lax.Precision.HIGHEST


def config_from_parity(cfg):
  """The `tokenizer` ConfigDict of the official tiny model described by config.json."""
  c = defaults.tokenizer_model_config()
  c.image_size = cfg["image_size"]
  c.num_tokens = cfg["num_latent_tokens"]
  c.group_size = cfg["group_size"]
  c.causal_num = cfg["causal_num"]
  c.codebook_size = cfg["codebook_size"]
  c.codebook_dim = cfg["codebook_embed_dim"]
  c.commitment_beta = cfg["reference_model_args"]["commit_loss_beta"]
  for tower in ("encoder", "decoder"):
    t = cfg[tower]
    c[tower] = defaults.vit_config(t["width"], t["layers"], t["heads"], t["mlp"],
                                          t["patch_size"], cfg["pos_emb_grid"])
    c[tower].layer_norm_eps = cfg["layer_norm_eps"]
  return c


def _case_names(field, key):
  """Names of the cases config.json lists under `field` (collection time, for parametrize)."""
  return parity_params("tokenizer/config.json", lambda cfg: [c[key] for c in cfg[field]])


def _case(official, field, key, name):
  return next(c for c in official.case.config[field] if c[key] == name)


def nhwc(x):
  return jnp.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


class Official:
  """The official tiny tokenizer loaded into our model, with jitted entry points."""

  def __init__(self, case):
    self.case, self.io = case, case.io
    self.config = config_from_parity(case.config)
    self.model = tokenizer_lib.DetailFlowTokenizer(self.config, precision=HIGHEST)
    self.params = sd_lib.tokenizer_params_from_state_dict(case.state_dict, self.config)
    variables = {"params": self.params}
    apply = lambda *a, **k: self.model.apply(variables, *a, **k)
    self.encode = jax.jit(lambda x, m=None: apply(x, m, method="encode"), static_argnums=1)
    self.decode = jax.jit(lambda q, t, s: apply(q, t, s, method="decode"), static_argnums=(1, 2))
    self.decode_traced = jax.jit(lambda q, t, s: apply(q, t, s, method="decode"),
                                 static_argnums=2)
    self.decode_codes = jax.jit(lambda i, t, s: apply(i, t, s, method="decode_codes"),
                                static_argnums=(1, 2))
    self.self_correct = jax.jit(lambda x, q, sel: apply(x, q, selected_indices=sel,
                                                        method="self_correct"))
    self.clean = self.encode(nhwc(self.io["x"]))


@pytest.fixture(scope="session")
def official(parity_tokenizer):
  return Official(parity_tokenizer)


def test_encode_matches_official(official):
  io, out = official.io, official.clean
  errors = {k: max_relative_error(out[k], io[k]) for k in ("enc_latent", "h", "quant")}
  errors["enc_patch_hidden"] = max_relative_error(out["patch_hidden"], io["enc_patch_hidden"])
  print("encode max relative errors", errors)
  assert max(errors.values()) <= TOLERANCE, errors
  np.testing.assert_array_equal(out["indices"], io["indices"])
  np.testing.assert_allclose(
      official.model.apply({"params": official.params}, method=lambda m: m.quantize.normalized_codebook()),
      io["codebook_normalized"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("prefix", _case_names("encode_cases", "prefix"))
def test_encode_other_sizes_matches_official(official, prefix):
  case = _case(official, "encode_cases", "prefix", prefix)
  p, io = case["prefix"], official.io
  out = official.encode(nhwc(io[f"{p}_x"]), case["cur_max_token_num"])
  errors = {k: max_relative_error(out[k], io[f"{p}_{k}"]) for k in ("enc_latent", "h", "quant")}
  print(p, "max relative errors", errors)
  assert max(errors.values()) <= TOLERANCE, errors
  np.testing.assert_array_equal(out["indices"], io[f"{p}_indices"])


def test_encoder_masks_match_official(official):
  """Official masks are True = blocked; ours True = may attend."""
  cfg, io = official.case.config, official.io
  g, c = cfg["group_size"], cfg["causal_num"]
  patches = (cfg["image_size"] // cfg["encoder"]["patch_size"]) ** 2
  np.testing.assert_array_equal(
      detail.encoder_attention_mask(patches, cfg["num_latent_tokens"], g, c), ~io["enc_attn_mask"])
  for case in cfg["encode_cases"]:
    grid, m = case["patch_grid"], case["cur_max_token_num"]
    np.testing.assert_array_equal(detail.encoder_attention_mask(grid * grid, m, g, c),
                                  ~io[f"{case['prefix']}_enc_attn_mask"])


def decode_cases(official):
  """config.json decode_cases, or a skip when the fixture records none."""
  cases = official.case.config.get("decode_cases") or []
  if not cases:
    pytest.skip(f"{official.case.folder} records no decode cases")
  return cases


def test_decode_cases_match_official(official):
  errors = {}
  for case in decode_cases(official):
    pixels = official.decode(official.clean["quant"], case["t"], case["img_size"])
    assert pixels.shape == (official.io["x"].shape[0], case["img_size"], case["img_size"], 3)
    errors[case["name"]] = max_relative_error(nchw(pixels), official.io[case["name"]])
  print("decode max relative errors", errors)
  assert max(errors.values()) <= TOLERANCE, errors


def test_traced_num_tokens_decode_equals_sliced(official):
  quant = official.clean["quant"]
  cases = [(case["t"], case["img_size"]) for case in decode_cases(official)]
  for t, size in cases:
    sliced = official.decode(quant, t, size)
    masked = official.decode_traced(quant, jnp.int32(t), size)
    assert max_relative_error(masked, sliced) <= 1e-5, (t, size)
  # One compiled program per output size, whatever the token count.
  for t in {t for t, _ in cases}:
    official.decode_traced(quant, jnp.int32(t), cases[0][1])
  assert official.decode_traced._cache_size() == len({size for _, size in cases})


def test_decode_from_indices_matches_official(official):
  size = official.case.config["decode_code_size"]
  pixels = official.decode_codes(jnp.asarray(official.io["indices"]), None, size)
  err = max_relative_error(nchw(pixels), official.io["dec_from_indices_pixel"])
  print("dec_from_indices_pixel max relative error", err)
  assert err <= TOLERANCE


@pytest.mark.parametrize("prefix", _case_names("correction_cases", "prefix"))
def test_self_correction_matches_official(official, prefix):
  case = _case(official, "correction_cases", "prefix", prefix)
  p, io, end = case["prefix"], official.io, case["noise_end"]
  out = official.self_correct(nhwc(io["x"]), jnp.int32(case["noise_idx"]),
                              jnp.asarray(io[f"{p}_topk_selected_indices"]))
  assert int(out["noise_end"]) == end
  errors = {
      "quant_noise": max_relative_error(out["quant_noise"][:, :end], io[f"{p}_quant_noise"]),
      "noise_token": max_relative_error(out["noise_token"][:, :end], io[f"{p}_noise_token"]),
      "enc_latent": max_relative_error(out["enc_latent"], io[f"{p}_enc_latent"]),
      "h": max_relative_error(out["h"], io[f"{p}_h"]),
      "quant": max_relative_error(out["quant"], io[f"{p}_quant"]),
  }
  print(p, "max relative errors", errors)
  assert max(errors.values()) <= TOLERANCE, errors
  np.testing.assert_array_equal(out["indices"], io[f"{p}_indices_new"])
  np.testing.assert_array_equal(out["index_triplet"], io[f"{p}_index_triplet"])


def test_state_dict_round_trip_is_exact(official):
  exported = sd_lib.tokenizer_state_dict_from_params(official.params, official.config)
  original = official.case.state_dict
  assert set(exported) == set(original)
  for key, value in original.items():
    if key == sd_lib.CODEBOOK_USED_KEY:
      assert exported[key].shape == value.shape and exported[key].dtype == np.float32
      assert not exported[key].any()
    else:
      assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
      np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_state_dict_errors_name_the_tensor(official):
  sd, config = dict(official.case.state_dict), official.config
  missing = dict(sd)
  del missing["decoder.mask_token"]
  with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): decoder.mask_token"):
    sd_lib.tokenizer_params_from_state_dict(missing, config)
  extra = dict(sd, **{"decoder.extra_head.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match="unexpected tensor.*decoder.extra_head.weight"):
    sd_lib.tokenizer_params_from_state_dict(extra, config)
  rows, cols = sd["quant_conv.weight"].shape
  wrong = dict(sd, **{"quant_conv.weight": np.zeros((rows, cols + 1), np.float32)})
  with pytest.raises(ValueError, match=rf"quant_conv.weight has shape \({rows}, {cols + 1}\), "
                                       rf"this model expects \({rows}, {cols}\)"):
    sd_lib.tokenizer_params_from_state_dict(wrong, config)
  # The training-only ring buffer may be absent.
  without_buffer = dict(sd)
  del without_buffer[sd_lib.CODEBOOK_USED_KEY]
  sd_lib.tokenizer_params_from_state_dict(without_buffer, config)
