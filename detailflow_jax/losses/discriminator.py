"""Builds the configured discriminator and applies it with explicit, pure state.

`make_discriminator(loss_config, image_size, rng)` returns (module, params, state):
  params  the trainable weights (what the discriminator optimizer updates);
  state   {'batch_stats': BatchNorm statistics and spectral-norm u vectors, updated by every
           training call} plus, for the DINO discriminator, {'backbone': frozen DINO weights},
           kept out of `params` so no optimizer ever touches them.
`discriminator_apply(module, params, state, images, rng=None, train=True)` -> (logits (B, K),
new_state).

Config keys read (the `loss` section): discriminator ('dino' | 'patchgan'), dino_weights (path,
needed for 'dino'); optional: dino_num_heads (default width // 64), patchgan_channels (64),
patchgan_layers (3), patchgan_spectral_norm (False).
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from detailflow_jax.losses import discriminator_dino
from detailflow_jax.losses import discriminator_patchgan
from detailflow_jax.models import dino

DISCRIMINATORS = ("dino", "patchgan")


def _get(config, key, default):
  return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def make_discriminator(loss_config, image_size, rng):
  """(module, params, state) for loss_config.discriminator; see the module docstring.

  image_size: the PatchGAN's fixed input side (inputs of other sizes are resized to it); the
  DINO discriminator always resizes to its backbone's 224 and ignores it.
  """
  # XLA:CPU compiles partitionable threefry ~8x slower (tens of seconds for a handful of
  # initialisers); these small replicated params do not need it.
  with jax.threefry_partitionable(False):
    return _make_discriminator(loss_config, image_size, rng)


def _make_discriminator(loss_config, image_size, rng):
  kind = _get(loss_config, "discriminator", "dino")
  if kind == "dino":
    backbone, arch = dino.load_dino(_get(loss_config, "dino_weights", ""), "loss.dino_weights",
                                    num_heads=_get(loss_config, "dino_num_heads", None))
    module = discriminator_dino.DinoDiscriminator(**arch)
    params, batch_stats = discriminator_dino.init_heads(module, rng)
    state = {"batch_stats": batch_stats,
             "backbone": jax.tree_util.tree_map(jnp.asarray, backbone)}
    return module, params, state
  if kind == "patchgan":
    module = discriminator_patchgan.PatchGANDiscriminator(
        input_size=image_size,
        channels=_get(loss_config, "patchgan_channels", 64),
        num_layers=_get(loss_config, "patchgan_layers", 3),
        spectral_norm=_get(loss_config, "patchgan_spectral_norm", False))
    probe = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda r: module.init(r, probe, train=False))(rng)
    return module, variables["params"], {"batch_stats": variables["batch_stats"]}
  raise ValueError(f"loss.discriminator={kind!r} is not one of {DISCRIMINATORS}")


# Logical axes of the discriminators' params, by rank: both are stacks of convolutions (and
# BatchNorm scales and biases). flax's SpectralNorm cannot read kernels boxed by
# nn.with_logical_partitioning, so the axes are declared here rather than in the initialisers.
# No conv name has a mesh axis in train/sharding.py: the discriminators are small and replicated.
CONV_AXES = {4: P("conv_height", "conv_width", "conv_in", "conv_out"),
             3: P("conv_width", "conv_in", "conv_out"), 1: P("conv_out")}


def param_logical_axes(params):
  """PartitionSpecs of logical axis names for a discriminator's params (same tree)."""
  return jax.tree_util.tree_map(lambda x: CONV_AXES.get(jnp.ndim(x), P()), params)


def discriminator_apply(module, params, state, images, rng=None, train=True):
  """Logits (B, K) and the new state. Gradients reach `params` and `images`, never the frozen
  backbone. train=True uses batch statistics and updates BatchNorm/spectral-norm state, as the
  reference's discriminator does in both the generator and the discriminator step."""
  full_params = dict(params)
  if "backbone" in state:
    full_params["backbone"] = jax.lax.stop_gradient(state["backbone"])
  variables = {"params": full_params, "batch_stats": state["batch_stats"]}
  if not train:
    return module.apply(variables, images, train=False, rng=rng), state
  logits, updates = module.apply(variables, images, train=True, rng=rng, mutable=["batch_stats"])
  return logits, {**state, "batch_stats": updates["batch_stats"]}
