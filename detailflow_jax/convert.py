"""Checkpoint conversion between our orbax workdirs and the official PyTorch run layout.

  python -m detailflow_jax.convert to-torch --checkpoint WORKDIR [--step S] [--ema] --out DIR
      [--format pt|safetensors]
  python -m detailflow_jax.convert from-torch --run DIR [--step S] [--ema] --workdir OUT
      [--tokenizer-workdir TOKENIZER_WORKDIR] [--override KEY=VALUE ...] [--trust-pickle]

to-torch writes DIR/config.json, DIR/config.yaml and DIR/checkpoints/<step>.pt (or
.safetensors) for a tokenizer or an AR workdir; from-torch reads such a run (an official release
included) into a workdir that our jobs load like a trained one. Tensor names, shapes and layouts
are the official ones (interop/tokenizer_state_dict.py, interop/gpt_state_dict.py).

--ema: to-torch stores the EMA weights as "model" too (for official scripts that load "model");
from-torch makes the official "ema" weights our params. Without it both keep their roles.
"""
import argparse
import os
import sys

import jax
import ml_collections
import yaml

from detailflow_jax.config import defaults
from detailflow_jax import workdir_io
from detailflow_jax.interop import checkpoint_io
from detailflow_jax.interop import gpt_state_dict
from detailflow_jax.interop import official_config as config_lib
from detailflow_jax.interop import official_run as run_lib
from detailflow_jax.interop import tokenizer_state_dict
from detailflow_jax.losses import alignment
from detailflow_jax.models import gpt_config as gpt_lib
from detailflow_jax.models import tokenizer as tokenizer_lib

_ALIGN_PREFIX = alignment.OFFICIAL_PREFIX
# The frozen SigLIP2 feature model of an official tokenizer trained with the alignment loss:
# not a trained weight, and ours comes from loss.siglip_weights, so it is not imported.
_FROZEN_FEATURE_PREFIX = "repa_model."


def _leaf_paths(tree):
  return {tuple(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_all_mapped(tree, mapped_paths, what):
  extra = sorted("/".join(p) for p in _leaf_paths(tree) - set(mapped_paths))
  if extra:
    raise ValueError(f"{what} params have {len(extra)} leaves the official layout has no place "
                     f"for: {', '.join(extra[:10])}")


# ----------------------------------------------------------------------------- export

def _tokenizer_entries(tree, config):
  mapped = [path for _, path, _ in tokenizer_state_dict.tokenizer_key_map(config)]
  _check_all_mapped(tree["tokenizer"], mapped, "tokenizer")
  model = tokenizer_state_dict.tokenizer_state_dict_from_params(tree["tokenizer"], config)
  align = (alignment.alignment_mlp_state_dict_from_params(tree["align_mlp"])
           if "align_mlp" in tree else None)
  return model, align


def _gpt_entry(tree, config):
  # pylint: disable-next=protected-access
  _check_all_mapped(tree, [p for p, _, _ in gpt_state_dict._key_map(config).values()], "GPT")
  return gpt_state_dict.gpt_state_dict_from_params(tree, config)


def to_official(workdir, out_dir, *, step=None, use_ema=False, fmt="pt"):
  """Exports a workdir checkpoint to the official run layout. Returns the checkpoint path."""
  weights = checkpoint_io.read_workdir(workdir, step)
  if use_ema and not weights.ema_params:
    raise ValueError(f"--ema: the checkpoint of step {weights.step} in {workdir} has no EMA "
                     "weights (trained with train.ema_decay=0)")
  source = weights.ema_params if use_ema else weights.params
  entries = {}
  if weights.kind == checkpoint_io.TOKENIZER:
    config = weights.config.tokenizer
    entries[run_lib.MODEL], align = _tokenizer_entries(source, config)
    if align is not None:
      entries[run_lib.ALIGN] = align
    if weights.ema_params:
      entries[run_lib.EMA], align_ema = _tokenizer_entries(weights.ema_params, config)
      if align_ema is not None:
        entries[run_lib.ALIGN_EMA] = align_ema
    model_args = config_lib.tokenizer_model_args(config)
    train_args = config_lib.tokenizer_train_args(weights.config, bool(weights.ema_params))
  else:
    config = gpt_lib.GPTConfig.from_dict(weights.config.gpt)
    entries[run_lib.MODEL] = _gpt_entry(source, config)
    if weights.ema_params:
      entries[run_lib.EMA] = _gpt_entry(weights.ema_params, config)
    model_args = config_lib.gpt_model_args(config)
    train_args = config_lib.gpt_train_args(weights.config, config, bool(weights.ema_params))
  run = run_lib.OfficialRun(weights.kind, model_args, train_args, entries, weights.step)
  return run_lib.write_run(out_dir, run, fmt)


# ----------------------------------------------------------------------------- import

def _parse_overrides(overrides):
  parsed = []
  for item in overrides or ():
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--override {item!r} must look like KEY=VALUE (e.g. encoder.num_heads=4)")
    parsed.append((key.strip(), yaml.safe_load(value)))
  return parsed


def _apply_overrides(config, overrides, what):
  """Sets KEY=VALUE (dotted keys) in the model config; unknown keys raise."""
  for key, value in overrides:
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name] if name in node else None
      if node is None:
        break
    if node is None or leaf not in node:
      raise ValueError(f"--override {key}: the {what} config has no key {key}")
    node[leaf] = config_lib.coerce(value, node[leaf])
  return config


def _split_tokenizer_state_dict(state_dict):
  """(tokenizer tensors, alignment MLP tensors) of an official VQModel state dict."""
  main, align = {}, {}
  for key, value in state_dict.items():
    if key.startswith(_ALIGN_PREFIX):
      align[key] = value
    elif not key.startswith(_FROZEN_FEATURE_PREFIX):
      main[key] = value
  return main, align


def _tokenizer_tree(state_dict, align_entry, config):
  main, align = _split_tokenizer_state_dict(state_dict)
  tree = {"tokenizer": tokenizer_state_dict.tokenizer_params_from_state_dict(main, config)}
  align = align or align_entry
  if align:
    tree["align_mlp"] = alignment.alignment_mlp_params_from_state_dict(align)
  return tree


def _check_pairing(gpt_config, tokenizer_workdir):
  tok = workdir_io.load_workdir_config(tokenizer_workdir)
  if "tokenizer" not in tok:
    raise ValueError(f"--tokenizer-workdir {tokenizer_workdir} is not a tokenizer workdir")
  t = tok.tokenizer
  pairs = (("vocab_size", gpt_config.vocab_size, "codebook_size", t.codebook_size),
           ("block_size", gpt_config.block_size, "num_tokens", t.num_tokens),
           ("group_size", gpt_config.group_size, "group_size", t.group_size),
           ("causal_num", gpt_config.causal_num, "causal_num", t.causal_num))
  for gpt_name, gpt_value, tok_name, tok_value in pairs:
    if gpt_value != tok_value:
      raise ValueError(f"the GPT does not fit the tokenizer in {tokenizer_workdir}: GPT "
                       f"{gpt_name}={gpt_value} but tokenizer {tok_name}={tok_value}")


def official_to_weights(run, *, use_ema=False, overrides=(), tokenizer_workdir=None):
  """An OfficialRun -> WorkdirWeights (our training config with the model section set)."""
  wanted = run_lib.EMA if use_ema else run_lib.MODEL
  if wanted not in run.state_dicts:
    raise ValueError(f"the checkpoint has no '{wanted}' state dict (it has "
                     f"{sorted(run.state_dicts)}){'; drop --ema' if use_ema else ''}")
  state_dicts = {name: {config_lib.strip_wrappers(k): v for k, v in sd.items()}
                 for name, sd in run.state_dicts.items()}
  found = config_lib.state_dict_kind(state_dicts[wanted])
  if found is not None and found != run.kind:
    raise ValueError(f"the checkpoint holds a {found} state dict, but the run's config.json / "
                     f"config.yaml describe a {run.kind}: wrong checkpoint file for this run")
  ema_sd = state_dicts.get(run_lib.EMA)
  overrides = _parse_overrides(overrides)
  if run.kind == config_lib.TOKENIZER:
    model_config, unresolved = config_lib.tokenizer_config_from_official(
        run.model_args, run.train_args, state_dicts[wanted])
    _apply_overrides(model_config, overrides, "tokenizer")
    unresolved = [k for k in unresolved if k not in {key for key, _ in overrides}]
    if unresolved:
      raise ValueError(
          f"config.json names towers of no official size (encoder_model="
          f"{run.model_args.get('encoder_model')!r}, decoder_model="
          f"{run.model_args.get('decoder_model')!r}), so their head counts are unknown; pass "
          + " ".join(f"--override {k}=H" for k in unresolved))
    tokenizer_lib.validate_tokenizer_config(model_config)
    align_entry = state_dicts.get(run_lib.ALIGN_EMA if use_ema else run_lib.ALIGN)
    params = _tokenizer_tree(state_dicts[wanted], align_entry, model_config)
    ema = (_tokenizer_tree(ema_sd, state_dicts.get(run_lib.ALIGN_EMA), model_config)
           if ema_sd else {})
    config = defaults.tokenizer_training_config()
    config.tokenizer = model_config
  else:
    fields = config_lib.gpt_config_from_official(run.model_args, run.train_args)
    fields = _apply_overrides(ml_collections.ConfigDict(fields), overrides, "GPT").to_dict()
    gpt_config = gpt_lib.GPTConfig.from_dict(fields)
    params = gpt_state_dict.gpt_params_from_state_dict(state_dicts[wanted], gpt_config)
    ema = gpt_state_dict.gpt_params_from_state_dict(ema_sd, gpt_config) if ema_sd else {}
    config = defaults.ar_training_config()
    config.gpt = ml_collections.ConfigDict(gpt_config.to_dict())
    if tokenizer_workdir:
      _check_pairing(gpt_config, tokenizer_workdir)
      config.extract.tokenizer_workdir = os.path.abspath(tokenizer_workdir)
  config_lib.apply_train_args(config, run.train_args, run.kind)
  if not ema:
    config.train.ema_decay = 0.0
  elif not config.train.ema_decay:
    config.train.ema_decay = config_lib.OFFICIAL_EMA_DECAY
  return checkpoint_io.WorkdirWeights(run.kind, config, params, ema, run.step)


def from_official(run_path, workdir, *, step=None, use_ema=False, tokenizer_workdir=None,
                  overrides=(), trust_pickle=False):
  """Imports an official run (folder or checkpoint file) into a new workdir. Returns the
  WorkdirWeights written."""
  run = run_lib.read_run(run_path, step, trust_pickle=trust_pickle)
  weights = official_to_weights(run, use_ema=use_ema, overrides=overrides,
                                tokenizer_workdir=tokenizer_workdir)
  checkpoint_io.write_workdir(workdir, weights.config, weights.params, weights.ema_params,
                              weights.step)
  return weights


# ----------------------------------------------------------------------------- CLI

def build_parser():
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  out = sub.add_parser("to-torch", help="workdir checkpoint -> official run layout")
  out.add_argument("--checkpoint", required=True, help="our workdir (tokenizer or AR run)")
  out.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  out.add_argument("--ema", action="store_true", help="store the EMA weights as 'model' too")
  out.add_argument("--out", required=True, help="output run folder")
  out.add_argument("--format", choices=("pt", "safetensors"), default="pt",
                   help="pt needs torch; safetensors does not")
  into = sub.add_parser("from-torch", help="official run (or release) -> new workdir")
  into.add_argument("--run", required=True,
                    help="official run folder (config.json, config.yaml, checkpoints/) or one "
                         "checkpoint file in it")
  into.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  into.add_argument("--ema", action="store_true", help="import the 'ema' weights as params")
  into.add_argument("--workdir", required=True, help="new workdir to write")
  into.add_argument("--tokenizer-workdir", default=None,
                    help="GPT import: the imported tokenizer it generates codes for (checked "
                         "and recorded as extract.tokenizer_workdir)")
  into.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="set a model config key the official files do not determine, e.g. "
                         "encoder.num_heads=4 (repeatable)")
  into.add_argument("--trust-pickle", action="store_true",
                    help="allow arbitrary pickled objects in a .pt file (trusted files only)")
  return parser


def main(argv=None):
  args = build_parser().parse_args(argv)
  try:
    if args.command == "to-torch":
      path = to_official(args.checkpoint, args.out, step=args.step, use_ema=args.ema,
                         fmt=args.format)
      print(f"wrote {path} (+ config.json, config.yaml in {args.out})")
    else:
      weights = from_official(args.run, args.workdir, step=args.step, use_ema=args.ema,
                              tokenizer_workdir=args.tokenizer_workdir,
                              overrides=args.override, trust_pickle=args.trust_pickle)
      print(f"imported the {weights.kind} of step {weights.step} into {args.workdir}"
            + (" (with EMA weights)" if weights.ema_params else ""))
  except (ValueError, ImportError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
