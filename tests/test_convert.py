"""Checkpoint conversion: our workdirs <-> the official run layout (.pt and safetensors).

The random models are built from their param shapes (no jitted init), so the tests spend their
time on conversion and on the few forward passes that compare with the official outputs.
"""
import argparse
import functools
import json
import pathlib
import re
import shutil
import sys

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from conftest import max_relative_error, parity_folders, parity_scale_name
from detailflow_jax import api
from detailflow_jax.config import defaults
from detailflow_jax import convert
from detailflow_jax import sampling
from detailflow_jax import workdir_io
from detailflow_jax.interop import checkpoint_io
from detailflow_jax.interop import official_config as config_lib
from detailflow_jax.interop import official_run
from detailflow_jax.interop import tokenizer_state_dict
from detailflow_jax.models import gpt as gpt_lib
from detailflow_jax.models import tokenizer as tokenizer_lib

HIGHEST = jax.lax.Precision.HIGHEST


def random_tree(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def assert_trees_identical(actual, expected):
  flat_a, tree_a = jax.tree_util.tree_flatten(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten(expected)
  assert tree_a == tree_e
  for a, e in zip(flat_a, flat_e):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype and a.shape == e.shape
    np.testing.assert_array_equal(a, e)


def small_tokenizer_config():
  c = defaults.tokenizer_training_config()
  t = c.tokenizer
  t.image_size, t.num_tokens, t.group_size, t.causal_num = 16, 8, 4, 4
  t.codebook_size, t.codebook_dim, t.min_decoder_size = 64, 8, 8
  t.encoder = defaults.vit_config(16, 1, 2, 64, 4, 4)
  t.decoder = defaults.vit_config(16, 1, 2, 64, 4, 4)
  c.loss.align_weight = 1.0
  c.train.ema_decay = 0.999
  return c


def small_gpt_config():
  """A GPT that predicts the codes of small_tokenizer_config (N=8, g=c=4, 64 codes)."""
  c = defaults.ar_training_config("B")
  c.gpt.update(dict(vocab_size=64, num_layers=1, dim=16, num_heads=2, num_classes=3,
                    block_size=8, group_size=4, causal_num=4))
  return c


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """{"tokenizer": workdir, "gpt": workdir} of small random models, both with EMA weights."""
  root = tmp_path_factory.mktemp("workdirs")
  tok_config = small_tokenizer_config()
  tok_shapes = {"tokenizer": tokenizer_lib.param_shapes(tok_config.tokenizer),
                "align_mlp": {f"layers_{i}": {"kernel": jax.ShapeDtypeStruct(s, np.float32),
                                              "bias": jax.ShapeDtypeStruct(s[-1:], np.float32)}
                              for i, s in ((0, (8, 12)), (2, (12, 12)), (4, (12, 20)))}}
  checkpoint_io.write_workdir(root / "tokenizer", tok_config, random_tree(tok_shapes, 0),
                              random_tree(tok_shapes, 1), 5)
  gpt_config = small_gpt_config()
  gpt_shapes = jax.eval_shape(
      lambda: gpt_lib.init_params(gpt_lib.GPTConfig.from_dict(gpt_config.gpt),
                                  jax.random.PRNGKey(0)))
  checkpoint_io.write_workdir(root / "gpt", gpt_config, random_tree(gpt_shapes, 2),
                              random_tree(gpt_shapes, 3), 9)
  return {"tokenizer": root / "tokenizer", "gpt": root / "gpt"}


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("kind", ["tokenizer", "gpt"])
def test_roundtrip_is_identity(workdirs, tmp_path, kind, fmt):
  if fmt == "pt":
    pytest.importorskip("torch")
  original = checkpoint_io.read_workdir(workdirs[kind])
  path = convert.to_official(workdirs[kind], tmp_path / "official", fmt=fmt)
  assert path.name == (f"{original.step:07d}.pt" if fmt == "pt"
                       else f"{original.step:07d}.safetensors")
  convert.from_official(tmp_path / "official", tmp_path / "back")
  back = checkpoint_io.read_workdir(tmp_path / "back")
  assert (back.kind, back.step) == (kind, original.step)
  assert_trees_identical(back.params, original.params)
  assert_trees_identical(back.ema_params, original.ema_params)
  assert back.config[kind].to_dict() == original.config[kind].to_dict()
  if kind == "tokenizer":
    assert set(back.params) == {"tokenizer", "align_mlp"}


def test_export_ema_as_model(workdirs, tmp_path):
  convert.to_official(workdirs["gpt"], tmp_path / "official", use_ema=True, fmt="safetensors")
  files = official_run.list_checkpoints(tmp_path / "official" / "checkpoints")[9]["safetensors"]
  model = official_run.load_safetensors(files["model"])
  ema = official_run.load_safetensors(files["ema"])
  assert model.keys() == ema.keys()
  assert all(np.array_equal(model[k], ema[k]) for k in model)
  # Importing with --ema makes the official "ema" weights our params.
  convert.from_official(tmp_path / "official", tmp_path / "back", use_ema=True)
  original = checkpoint_io.read_workdir(workdirs["gpt"])
  assert_trees_identical(checkpoint_io.read_workdir(tmp_path / "back").params,
                         original.ema_params)


def test_sample_runs_on_imported_pair(workdirs, tmp_path):
  """Official runs imported as a (tokenizer, GPT) pair sample exactly like the originals."""
  for kind in ("tokenizer", "gpt"):
    convert.to_official(workdirs[kind], tmp_path / f"official_{kind}", fmt="safetensors")
  convert.from_official(tmp_path / "official_tokenizer", tmp_path / "tok")
  convert.from_official(tmp_path / "official_gpt", tmp_path / "ar",
                        tokenizer_workdir=tmp_path / "tok")
  config = workdir_io.load_workdir_config(tmp_path / "ar")
  assert config.extract.tokenizer_workdir == str((tmp_path / "tok").absolute())
  labels = np.array([0, 2])
  loaded = api.load_sampler_params(tmp_path / "tok", tmp_path / "ar")
  assert "kernel_t" in loaded.gpt["output"]   # the decoding layout (gpt.to_decoding_layout)
  imported = api.sample(loaded, labels, rng=jax.random.PRNGKey(3))
  original = api.sample(api.load_sampler_params(workdirs["tokenizer"], workdirs["gpt"]),
                        labels, rng=jax.random.PRNGKey(3))
  assert imported.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(np.asarray(imported), np.asarray(original))


def test_gpt_import_checks_the_tokenizer_pairing(workdirs, tmp_path):
  other = small_tokenizer_config()
  other.tokenizer.codebook_size = 128
  tok_shapes = {"tokenizer": tokenizer_lib.param_shapes(other.tokenizer)}
  checkpoint_io.write_workdir(tmp_path / "tok32", other, random_tree(tok_shapes, 0), {}, 1)
  convert.to_official(workdirs["gpt"], tmp_path / "official_gpt", fmt="safetensors")
  with pytest.raises(ValueError, match="vocab_size=64 but tokenizer codebook_size=128"):
    convert.from_official(tmp_path / "official_gpt", tmp_path / "ar",
                          tokenizer_workdir=tmp_path / "tok32")


# ----------------------------------------------------------------------------- official parity

def write_official_run(directory, model_args, train_args, state_dict, fmt="safetensors",
                       step=1):
  """An official run folder as the official trainers lay it out."""
  directory = pathlib.Path(directory)
  (directory / "checkpoints").mkdir(parents=True)
  (directory / "config.json").write_text(json.dumps(model_args))
  (directory / "config.yaml").write_text(yaml.safe_dump(train_args))
  if fmt == "pt":
    torch = pytest.importorskip("torch")
    # As the official trainers save it: args (a Namespace) and optimizer state beside "model".
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "steps": step, "args": argparse.Namespace(**train_args)},
               directory / "checkpoints" / f"{step}.pt")
  else:
    save_file(dict(state_dict), str(directory / "checkpoints" / f"{step}.safetensors"))
  return directory


def parity_tokenizer_heads(case):
  """The --override flags naming the head counts of the fixture's custom towers."""
  return [f"{tower}.num_heads={case.config[tower]['heads']}" for tower in ("encoder", "decoder")]


def parity_tokenizer_run(case, directory, fmt="safetensors", state_dict=None):
  args = case.config["reference_model_args"]
  # min_image_size: one decoder patch (the smallest decode), as in the fixture's tables.
  train_args = dict(vq_model="VQ-16", content_degradation="resolution_power", enc_type="siglip2",
                    max_image_size=args["max_image_size"],
                    min_image_size=case.config["decoder"]["patch_size"],
                    num_latent_tokens=args["num_latent_tokens"], group_size=args["group_size"],
                    degradation_power=1.5)
  return write_official_run(directory, args, train_args,
                            case.state_dict if state_dict is None else state_dict, fmt)


def parity_gpt_run(case, directory, fmt="safetensors", state_dict=None):
  return write_official_run(directory, case.config["reference_model_args"],
                            dict(gpt_model="GPT-custom", gpt_type="c2i", ema=False),
                            case.state_dict if state_dict is None else state_dict, fmt)


@pytest.fixture(scope="module")
def imported_parity_tokenizer(parity_tokenizer, tmp_path_factory):
  root = tmp_path_factory.mktemp("parity_tokenizer")
  parity_tokenizer_run(parity_tokenizer, root / "official")
  convert.from_official(root / "official", root / "workdir",
                        overrides=parity_tokenizer_heads(parity_tokenizer))
  return root / "workdir"


def test_imported_official_tokenizer_reproduces_outputs(parity_tokenizer,
                                                        imported_parity_tokenizer):
  io, cfg = parity_tokenizer.io, parity_tokenizer.config
  loaded = workdir_io.load_tokenizer(imported_parity_tokenizer)
  model = tokenizer_lib.DetailFlowTokenizer(loaded.config, precision=HIGHEST)
  variables = {"params": loaded.params}
  encoded = jax.jit(lambda x: model.apply(variables, x, method="encode"))(
      np.asarray(io["x"]).transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(encoded["indices"], io["indices"])
  assert max_relative_error(encoded["h"], io["h"]) <= 1e-4
  size = cfg["decode_code_size"]
  pixels = jax.jit(lambda i: model.apply(variables, i, None, size, method="decode_codes"))(
      io["indices"])
  error = max_relative_error(np.asarray(pixels).transpose(0, 3, 1, 2), io["dec_from_indices_pixel"])
  print("imported official tokenizer: decode max relative error", error)
  assert error <= 1e-4


def test_imported_official_gpt_reproduces_outputs(parity_gpt, tmp_path):
  parity_gpt_run(parity_gpt, tmp_path / "official")
  convert.from_official(tmp_path / "official", tmp_path / "workdir")
  loaded = workdir_io.load_gpt(tmp_path / "workdir")
  io = parity_gpt.io
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(lambda c, l: gpt_lib.GPT(loaded.config).apply(
        {"params": loaded.params}, c, l))(io["train_idx"], io["train_labels"])
    error = max_relative_error(logits, io["train_logits"])
    print(f"imported official GPT {parity_gpt.folder.name}: logits max relative error", error)
    assert error <= 1e-4
    if parity_gpt.folder.name == parity_folders("gpt")[0]:   # one sampler compile is enough
      greedy = parity_gpt.config["greedy"]
      codes = sampling.generate_codes(loaded.params, loaded.config, io["gen_labels"],
                                      rng=jax.random.PRNGKey(0), cfg_scale=greedy["cfg_scale"],
                                      top_k=greedy["top_k"])
      np.testing.assert_array_equal(
          np.asarray(codes), io[f"greedy_cfg{parity_scale_name(greedy['cfg_scale'])}_tokens"])


def test_pt_and_safetensors_imports_agree(parity_tokenizer, imported_parity_tokenizer, tmp_path):
  pytest.importorskip("torch")
  parity_tokenizer_run(parity_tokenizer, tmp_path / "official", fmt="pt")
  convert.from_official(tmp_path / "official", tmp_path / "workdir",
                        overrides=parity_tokenizer_heads(parity_tokenizer))
  assert_trees_identical(checkpoint_io.read_workdir(tmp_path / "workdir").params,
                         checkpoint_io.read_workdir(imported_parity_tokenizer).params)


def exported_model_state_dict(workdir, out):
  convert.to_official(workdir, out, fmt="safetensors")
  files = official_run.list_checkpoints(pathlib.Path(out) / "checkpoints")
  return official_run.load_safetensors(files[max(files)]["safetensors"]["model"])


def assert_same_layout(exported, official):
  assert list(sorted(exported)) == list(sorted(official))
  for key, value in official.items():
    assert (exported[key].shape, exported[key].dtype) == (value.shape, value.dtype), key


def test_exported_tokenizer_has_the_official_layout(parity_tokenizer, imported_parity_tokenizer,
                                                   tmp_path):
  exported = exported_model_state_dict(imported_parity_tokenizer, tmp_path / "out")
  assert_same_layout(exported, parity_tokenizer.state_dict)
  for key, value in parity_tokenizer.state_dict.items():
    if key != "quantize.codebook_used":   # a training-time buffer; we write zeros
      np.testing.assert_array_equal(exported[key], value, err_msg=key)
  args = json.loads((tmp_path / "out" / "config.json").read_text())
  assert args == parity_tokenizer.config["reference_model_args"]
  train_args = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
  for key in ("vq_model", "content_degradation", "enc_type", "max_image_size", "min_image_size",
              "num_latent_tokens", "group_size", "degradation_power"):
    assert key in train_args, key


def test_exported_gpt_has_the_official_layout(parity_gpt, tmp_path):
  parity_gpt_run(parity_gpt, tmp_path / "official")
  convert.from_official(tmp_path / "official", tmp_path / "workdir")
  exported = exported_model_state_dict(tmp_path / "workdir", tmp_path / "out")
  assert_same_layout(exported, parity_gpt.state_dict)
  for key, value in parity_gpt.state_dict.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  args = json.loads((tmp_path / "out" / "config.json").read_text())
  official = dict(parity_gpt.config["reference_model_args"])
  # Our config keeps the SwiGLU width, not the official rounding step: the export writes the
  # largest multiple_of that gives that width (the official value or another one as good).
  assert (gpt_lib.ffn_hidden_size(args["dim"], args.pop("multiple_of")) ==
          gpt_lib.ffn_hidden_size(official["dim"], official.pop("multiple_of")))
  assert args == official
  assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["gpt_model"] == "GPT-custom"


def test_release_tokenizer_with_alignment_and_frozen_siglip(parity_tokenizer, tmp_path):
  """Released tokenizers trained with the alignment loss also hold `global_token_proj.*` (the
  alignment MLP: imported) and `repa_model.*` (the frozen SigLIP2: not a trained weight)."""
  rng = np.random.default_rng(0)
  sd = dict(parity_tokenizer.state_dict)
  code_dim = parity_tokenizer.config["codebook_embed_dim"]   # the MLP maps the first token
  for i, (out_dim, in_dim) in ((0, (12, code_dim)), (2, (12, 12)), (4, (20, 12))):
    sd[f"global_token_proj.{i}.weight"] = rng.standard_normal((out_dim, in_dim)).astype(np.float32)
    sd[f"global_token_proj.{i}.bias"] = rng.standard_normal(out_dim).astype(np.float32)
  sd["repa_model.visual_model.post_layernorm.weight"] = np.ones(20, np.float32)
  sd = {f"module.{k}": v for k, v in sd.items()}   # a DDP-wrapped state dict
  parity_tokenizer_run(parity_tokenizer, tmp_path / "official", state_dict=sd)
  weights = convert.from_official(tmp_path / "official", tmp_path / "workdir",
                                  overrides=parity_tokenizer_heads(parity_tokenizer))
  np.testing.assert_array_equal(weights.params["align_mlp"]["layers_4"]["kernel"],
                                sd["module.global_token_proj.4.weight"].T)


def _zeros_like_shapes(shapes):
  # Broadcast views of one zero: full-size state dicts without allocating them.
  return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def test_release_sized_runs_are_understood():
  """The released DetailFlow-16 layout (SigLIP2 so400m encoder layers, ViT-B decoder, GPT-L):
  sizes and head counts come from the official names and the tensor shapes alone."""
  tok_config = defaults.tokenizer_model_config()
  shapes = tokenizer_lib.param_shapes(tok_config)
  sd_shapes = {key: (tuple(reversed(leaf.shape)) if transpose else leaf.shape)
               for key, path, transpose in tokenizer_state_dict.tokenizer_key_map(tok_config)
               for leaf in [functools.reduce(lambda t, k: t[k], path, shapes)]}
  sd_shapes["quantize.codebook_used"] = (65536,)
  model_args = config_lib.tokenizer_model_args(tok_config)
  assert (model_args["encoder_model"], model_args["enc_pretrained"]) == ("siglip2_base", True)
  assert (model_args["decoder_model"], model_args["dec_pretrained"]) == ("siglip2_base", False)
  model_args["global_token_loss_weight"] = 1.0   # as released (trained with alignment)
  train_args = dict(vq_model="VQ-16", content_degradation="resolution_power",
                    degradation_power=1.5, max_image_size=256, lr=1.0e-4, weight_decay="1e-4")
  run = official_run.OfficialRun("tokenizer", model_args, train_args,
                                 {"model": _zeros_like_shapes(sd_shapes)}, 128)
  weights = convert.official_to_weights(run)
  assert weights.config.tokenizer.to_dict() == tok_config.to_dict()
  assert weights.config.optim.weight_decay == 1e-4 and weights.config.loss.align_weight == 1.0

  gpt_config = gpt_lib.gpt_model_config("L", vocab_size=8192, block_size=128)
  assert config_lib.official_gpt_name(gpt_config) == "GPT-L"
  gpt_args = config_lib.gpt_model_args(gpt_config)
  assert config_lib.gpt_config_from_official(gpt_args, {}) == gpt_config.to_dict()


# ----------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def exported_gpt(workdirs, tmp_path_factory):
  out = tmp_path_factory.mktemp("exported") / "gpt"
  convert.to_official(workdirs["gpt"], out, fmt="safetensors")
  return out


def copy_run(source, destination):
  shutil.copytree(source, destination)
  return destination


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_truncated_file_is_a_clear_error(workdirs, tmp_path, fmt):
  if fmt == "pt":
    pytest.importorskip("torch")
  path = convert.to_official(workdirs["gpt"], tmp_path / "official", fmt=fmt)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"not a readable .* \(truncated or corrupt\?\)"):
    convert.from_official(tmp_path / "official", tmp_path / "workdir")


def test_wrong_model_file_is_a_clear_error(parity_tokenizer, exported_gpt, tmp_path):
  run = parity_tokenizer_run(parity_tokenizer, tmp_path / "official")
  for path in (run / "checkpoints").iterdir():
    path.unlink()
  shutil.copy(exported_gpt / "checkpoints" / "0000009.safetensors", run / "checkpoints")
  with pytest.raises(ValueError, match="holds a gpt state dict, but .* describe a tokenizer"):
    convert.from_official(run, tmp_path / "workdir",
                          overrides=parity_tokenizer_heads(parity_tokenizer))


def _edit_gpt_state_dict(exported_gpt, tmp_path, edit):
  run = copy_run(exported_gpt, tmp_path / "official")
  path = run / "checkpoints" / "0000009.safetensors"
  sd = dict(official_run.load_safetensors(path))
  edit(sd)
  save_file(sd, str(path))
  return run


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("layers.0.ffn_norm.weight"),
     r"missing tensors \['layers.0.ffn_norm.weight'\]"),
    (lambda sd: sd.update({"layers.0.extra.weight": np.zeros(3, np.float32)}),
     r"unknown tensors \['layers.0.extra.weight'\]"),
    (lambda sd: sd.update({"norm.weight": np.zeros(5, np.float32)}),
     r"tensor norm.weight has shape \(5,\), expected \(16,\)"),
])
def test_gpt_tensor_errors_name_the_tensor(exported_gpt, tmp_path, edit, message):
  run = _edit_gpt_state_dict(exported_gpt, tmp_path, edit)
  with pytest.raises(ValueError, match=message):
    convert.from_official(run, tmp_path / "workdir")


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("refine_conv.bias"), "missing 1 tensor.*refine_conv.bias"),
    (lambda sd: sd.update({"decoder.extra": np.zeros(3, np.float32)}),
     "unexpected tensor.*decoder.extra"),
    (lambda sd: sd.update({"refine_conv.bias": np.zeros(len(sd["refine_conv.bias"]) + 1,
                                                        np.float32)}),
     r"tensor refine_conv.bias has shape {wrong}, this model expects {expected}"),
])
def test_tokenizer_tensor_errors_name_the_tensor(parity_tokenizer, tmp_path, edit, message):
  sd = dict(parity_tokenizer.state_dict)
  expected = sd["refine_conv.bias"].shape   # shapes in the message: the fixture's, not literals
  edit(sd)
  if "refine_conv.bias" in sd:
    message = message.format(expected=re.escape(str(expected)),
                             wrong=re.escape(str(sd["refine_conv.bias"].shape)))
  run = parity_tokenizer_run(parity_tokenizer, tmp_path / "official", state_dict=sd)
  with pytest.raises(ValueError, match=message):
    convert.from_official(run, tmp_path / "workdir",
                          overrides=parity_tokenizer_heads(parity_tokenizer))


def test_custom_tower_needs_its_head_count(parity_tokenizer, tmp_path):
  run = parity_tokenizer_run(parity_tokenizer, tmp_path / "official")
  expected = "--override encoder.num_heads=H --override decoder.num_heads=H"
  with pytest.raises(ValueError, match=expected):
    convert.from_official(run, tmp_path / "workdir")


def test_cli(workdirs, tmp_path, capsys):
  assert convert.main(["to-torch", "--checkpoint", str(workdirs["tokenizer"]), "--out",
                       str(tmp_path / "official"), "--format", "safetensors"]) == 0
  assert convert.main(["from-torch", "--run", str(tmp_path / "official"), "--workdir",
                       str(tmp_path / "back"), "--step", "5"]) == 0
  assert "imported the tokenizer of step 5" in capsys.readouterr().out
  # An import never writes into a workdir that holds checkpoints.
  assert convert.main(["from-torch", "--run", str(tmp_path / "official"), "--workdir",
                       str(tmp_path / "back")]) == 2
  assert "already holds checkpoints [5]" in capsys.readouterr().err
  assert convert.main(["from-torch", "--run", str(tmp_path / "official"), "--workdir",
                       str(tmp_path / "other"), "--step", "4"]) == 2
  assert "step=4 has no checkpoint" in capsys.readouterr().err
  assert convert.main(["to-torch", "--checkpoint", str(tmp_path / "nowhere"), "--out",
                       str(tmp_path / "x")]) == 2
  assert "config.json not found" in capsys.readouterr().err


def test_pt_without_torch_says_how_to_get_it(workdirs, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)   # as if torch were not installed
  assert convert.main(["to-torch", "--checkpoint", str(workdirs["gpt"]), "--out",
                       str(tmp_path / "official")]) == 2
  assert "needs PyTorch: pip install -e .[torch]" in capsys.readouterr().err
