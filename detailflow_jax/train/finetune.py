"""Starting a tokenizer run from a trained one, optionally training only its decoder.

Not in the paper. `finetune.decoder_only` trains the path from codes to pixels
(`post_quant_conv` and the decoder) and freezes the rest, so the encoder, `quant_conv`, the
codebook and `refine_conv` (self-correction's re-embedding) stay as loaded: every image keeps
its codes, and a GPT trained on the codes of the loaded tokenizer samples through the
fine-tuned decoder unchanged. The default pipeline's `train decoder` stage uses it to give the
decoder steps the whole tokenizer had no time for; it also lets a trained decoder take another
objective (LPIPS, the GAN) without retraining the GPT (both measured in docs/recipe.md).
"""
import jax
import ml_collections
import numpy as np
import optax

from detailflow_jax import workdir_io

# The tokenizer params a decoder-only run trains; every other param (and the alignment MLP,
# which reads the first token) stays frozen.
DECODER_PARAMS = ("post_quant_conv", "decoder")


def _section(config):
  """config.finetune; configs written before the section existed train from scratch."""
  return config.get("finetune") or {"from_workdir": "", "decoder_only": False}


def decoder_only(config):
  return bool(_section(config)["decoder_only"])


def check(config):
  """Clear errors for a finetune section that cannot work."""
  f = ml_collections.ConfigDict(_section(config))
  if f.decoder_only and not f.from_workdir:
    raise ValueError("finetune.decoder_only=True needs finetune.from_workdir: the tokenizer "
                     "workdir whose encoder and codebook the run keeps")
  if f.decoder_only and config.code_reset.every:
    raise ValueError("finetune.decoder_only=True freezes the codebook, but code_reset.every="
                     f"{config.code_reset.every} would restart codes; set "
                     "--config.code_reset.every=0")


def initial_tokenizer_params(config):
  """The latest raw tokenizer params of finetune.from_workdir (None when it is empty), after
  checking that workdir's architecture is this run's."""
  workdir = _section(config)["from_workdir"]
  if not workdir:
    return None
  loaded = workdir_io.load_tokenizer(workdir)
  theirs, ours = dict(loaded.config), config.tokenizer.to_dict()
  # Keys a config saved by an older version lacks take their defaults on load: not compared.
  differ = [f"{k}: {theirs[k]!r} there, {ours[k]!r} here"
            for k in sorted(set(theirs) & set(ours)) if _plain(theirs[k]) != _plain(ours[k])]
  if differ:
    raise ValueError(f"finetune.from_workdir={workdir} has a different tokenizer ("
                     f"{'; '.join(differ)}); give this run the same `tokenizer` section")
  print(f"starting from the tokenizer of {workdir} (step {loaded.step})", flush=True)
  return loaded.params


CODEBOOK = ("params", "tokenizer", "quantize", "codebook")


def check_resume(config, workdir):
  """A decoder-only run that resumes in `workdir` must still sit on from_workdir's codes: when
  from_workdir's codebook has changed since (that tokenizer was retrained), the decoder here
  was trained for other codes, and going on would mix them. Raises a ValueError then."""
  if not decoder_only(config) or not workdir_io.checkpoint_steps(workdir):
    return
  ours, step = workdir_io.restore_state_subtree(workdir, CODEBOOK)
  source = _section(config)["from_workdir"]
  theirs, their_step = workdir_io.restore_state_subtree(source, CODEBOOK)
  if not np.array_equal(ours, theirs):
    raise ValueError(
        f"{workdir} (step {step}) holds a decoder trained on other codes than those of "
        f"finetune.from_workdir={source} (step {their_step}): that tokenizer changed since. "
        f"Delete {workdir} to train its decoder again")


def _plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else value


def _trained_mask(params):
  """True for the leaves a decoder-only run trains."""
  return {top: jax.tree_util.tree_map(lambda _: False, sub) if top != "tokenizer" else
          {name: jax.tree_util.tree_map(lambda _, t=name in DECODER_PARAMS: t, part)
           for name, part in sub.items()}
          for top, sub in params.items()}


def wrap_optimizer(tx, config):
  """tx for every param, or, decoder-only, tx for the decoder's and zero updates elsewhere (no
  optimizer state is kept for the frozen params; clipping sees only the trained gradients)."""
  if not decoder_only(config):
    return tx
  labels = lambda params: jax.tree_util.tree_map(
      lambda trained: "trained" if trained else "frozen", _trained_mask(params))
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def stop_frozen_gradients(params, config):
  """params with the frozen leaves behind stop_gradient, so the step does not differentiate
  through them at all (no encoder backward pass)."""
  if not decoder_only(config):
    return params
  return jax.tree_util.tree_map(lambda p, trained: p if trained else jax.lax.stop_gradient(p),
                                params, _trained_mask(params))
