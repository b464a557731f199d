"""The tokenizer's training objective and its one jitted step.

L_G = mse_w * MSE + lpips_w(t) * LPIPS + gan_w(t) * hinge_G + vq + commit + align_w * L_align
L_D = gan_w(t) * (hinge_D + lecam_w * LeCAM) + cr_w(t) * consistency   (digest section 1)

Reconstructions of the clean and of the self-corrected sequence are both compared with the same
degraded target (the target is tiled twice along the batch when correction is on).
"""
import functools

import flax
import jax
import jax.numpy as jnp
import optax

from detailflow_jax import dynamic_resolution
from detailflow_jax.losses import adversarial
from detailflow_jax.losses import alignment
from detailflow_jax.losses import discriminator
from detailflow_jax.losses import gan
from detailflow_jax.losses import perceptual
from detailflow_jax.models import tokenizer as tokenizer_model
from detailflow_jax.train import code_reset
from detailflow_jax.train import finetune
from detailflow_jax.train import optim


@flax.struct.dataclass
class TokenizerState:
  step: jax.Array
  params: dict            # {"tokenizer": ..., "align_mlp": ... (when aligning)}
  opt_state: optax.OptState
  disc_params: dict
  disc_state: dict        # BatchNorm statistics (+ the frozen DINO trunk, when used)
  disc_opt_state: optax.OptState
  lecam_state: gan.LecamState
  ema_params: dict        # {} when EMA is off
  code_usage: jax.Array   # (K,) running selection counts for dead-code restarts
  rng: jax.Array


def compute_dtype(name):
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if name not in dtypes:
    raise ValueError(f"train.compute_dtype={name!r}; valid: {', '.join(dtypes)}")
  return dtypes[name]


class TokenizerObjective:
  """Holds the modules, frozen feature models and optimizers; builds the train step."""

  def __init__(self, config):
    self.config = config
    self.loss = config.loss
    self.model = tokenizer_model.DetailFlowTokenizer(
        config.tokenizer, dtype=compute_dtype(config.train.compute_dtype))
    self.lpips_params, self.lpips_fn = (
        perceptual.make_lpips() if self.loss.lpips_weight else (None, None))
    self.siglip = None
    if self.loss.align_weight:
      from detailflow_jax.models import siglip2  # pylint: disable=g-import-not-at-top
      self.siglip = siglip2.load_feature_model(self.loss.siglip_weights, "loss.siglip_weights")
    if self.loss.gan_weight:
      self.disc_module, self.disc_init_params, self.disc_init_state = (
          discriminator.make_discriminator(
              self.loss, config.tokenizer.image_size, jax.random.PRNGKey(config.seed + 1)))
      self.disc_apply = functools.partial(discriminator.discriminator_apply, self.disc_module)
    else:  # no discriminator: nothing to build, train or checkpoint
      self.disc_module, self.disc_init_params, self.disc_init_state = None, {}, {}
      self.disc_apply = None
    batch = config.data.batch_size
    self.tx, self.lr_schedule = optim.adam_with_schedule(config.optim, config.train.num_steps, batch)
    self.tx = finetune.wrap_optimizer(self.tx, config)
    self.disc_tx, _ = optim.adam_with_schedule(
        config.optim, config.train.num_steps, batch,
        learning_rate=optim.scaled_learning_rate(config.optim, batch)
        if config.optim.disc_learning_rate is None else config.optim.disc_learning_rate)

  def frozen_params(self):
    """Pretrained feature models the loss uses but never trains. They are passed to the step
    as an argument: captured as constants, XLA would constant-fold the VGG weights into every
    compiled variant (minutes per compile)."""
    frozen = {}
    if self.lpips_params is not None:
      frozen["lpips"] = self.lpips_params
    if self.siglip is not None:
      frozen["siglip"] = self.siglip.params
    return frozen

  def num_latents(self, side):
    """Latent queries the encoder runs for inputs of `side` (static): None (all N) at
    tokenizer.image_size, else that side's token count (official cur_max_token_num)."""
    if side == self.config.tokenizer.image_size:
      return None
    return dynamic_resolution.tokens_for_size(self.config.tokenizer, side)

  def param_logical_axes(self):
    """Logical axis names of every trained param (train/sharding.py: state_shardings)."""
    axes = {"tokenizer": tokenizer_model.param_logical_axes(self.config.tokenizer)}
    if self.loss.align_weight:
      axes["align_mlp"] = alignment.alignment_mlp_logical_axes(
          self.config.tokenizer.codebook_dim, out_dim=self.siglip.width)
    trees = [axes]
    if self.disc_module is not None:
      trees.append(discriminator.param_logical_axes(self.disc_init_params))
    return trees

  def gan_active(self, step):
    """Whether the step runs the discriminator. As in the reference it runs on every step when
    the GAN is configured, with its loss weights zero before gan_start_step (adopt_weight on
    the traced step), so the start of the GAN does not compile new step variants."""
    del step
    return bool(self.loss.gan_weight)

  def init_state(self, rng, tokenizer_params=None):
    """A fresh state (call under jit with out_shardings to place it)."""
    tok_rng, mlp_rng, state_rng = jax.random.split(rng, 3)
    if tokenizer_params is None:
      tokenizer_params = tokenizer_model.init_params(self.config.tokenizer, tok_rng)
    params = {"tokenizer": tokenizer_params}
    if self.loss.align_weight:
      _, params["align_mlp"] = alignment.init_alignment_mlp(
          mlp_rng, self.config.tokenizer.codebook_dim, out_dim=self.siglip.width)
    ema = params if self.config.train.ema_decay else {}
    return TokenizerState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
        disc_params=self.disc_init_params, disc_state=self.disc_init_state,
        disc_opt_state=self.disc_tx.init(self.disc_init_params), lecam_state=gan.lecam_init(),
        ema_params=ema, code_usage=code_reset.init_usage(
            self.config.tokenizer.codebook_size,
            self.config.data.batch_size * self.config.tokenizer.num_tokens),
        rng=state_rng)

  def generator_loss(self, params, state, batch, frozen, rng, use_correction, gan_active):
    loss_cfg = self.loss
    step = state.step + 1
    fwd_rng, gan_rng = jax.random.split(rng)
    params = finetune.stop_frozen_gradients(params, self.config)
    target = batch["target"]
    out = self.model.apply(
        {"params": params["tokenizer"]}, batch["image"], batch["num_tokens"],
        batch["noise_position"] if use_correction else None, target.shape[1], fwd_rng,
        num_latents=self.num_latents(batch["image"].shape[1]),
        method=tokenizer_model.DetailFlowTokenizer.train_forward)
    recon = out["reconstructions"].astype(jnp.float32)
    if use_correction:
      target = jnp.concatenate([target, target], axis=0)
    mse = jnp.mean(jnp.square(recon - target))
    total = (loss_cfg.mse_weight * mse
             + loss_cfg.vq_weight * (out["vq_loss"] + out["commit_loss"]))
    metrics = dict(mse_loss=mse, vq_loss=out["vq_loss"],
                   commit_loss=out["commit_loss"], codebook_usage=out["codebook_usage"],
                   perplexity=out["perplexity"])
    if loss_cfg.lpips_weight:
      lpips = jnp.mean(self.lpips_fn(frozen["lpips"], recon, target))
      total = total + gan.warmup_weight(
          loss_cfg.lpips_weight, step, loss_cfg.lpips_warmup_steps) * lpips
      metrics["lpips_loss"] = lpips
    disc_state = state.disc_state
    if gan_active:
      g_term, aux = adversarial.generator_adversarial_loss(
          self.disc_apply, state.disc_params, disc_state, recon, gan_rng, step, loss_cfg)
      total = total + g_term
      disc_state = aux["disc_state"]
      metrics["gan_g_loss"] = aux["g_loss"]
    if loss_cfg.align_weight:
      features = self.siglip.features(frozen["siglip"], batch["image"])
      align = alignment.alignment_loss(params["align_mlp"], out["first_token"], features)
      total = total + loss_cfg.align_weight * align
      metrics["align_loss"] = align
    metrics["loss"] = total
    codes = dict(indices=out["indices"], z=out["z"])
    return total, (metrics, recon, target, disc_state, codes)

  def train_step(self, state, batch, frozen, *, use_correction, gan_active):
    rng = jax.random.fold_in(state.rng, state.step)
    gen_rng, disc_rng, reset_rng = jax.random.split(rng, 3)
    grad_fn = jax.value_and_grad(self.generator_loss, has_aux=True)
    (_, (metrics, recon, target, disc_state, codes)), grads = grad_fn(
        state.params, state, batch, frozen, gen_rng, use_correction, gan_active)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = self.lr_schedule(state.step)

    disc_params, disc_opt_state, lecam_state = (
        state.disc_params, state.disc_opt_state, state.lecam_state)
    if gan_active:
      def d_loss_fn(dp):
        return adversarial.discriminator_loss(
            self.disc_apply, dp, disc_state, target, recon, lecam_state, disc_rng,
            state.step + 1, self.loss)
      (d_loss, d_aux), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
      d_updates, disc_opt_state = self.disc_tx.update(d_grads, disc_opt_state, disc_params)
      disc_params = optax.apply_updates(disc_params, d_updates)
      disc_state, lecam_state = d_aux["disc_state"], d_aux["lecam_state"]
      metrics.update(disc_loss=d_loss, logits_real=d_aux["logits_real"],
                     logits_fake=d_aux["logits_fake"])

    ema = state.ema_params
    code_usage = state.code_usage
    if self.config.code_reset.every:
      params, ema, code_usage, metrics["codes_restarted"] = self._restart_dead_codes(
          params, ema, code_usage, codes, state.step + 1, reset_rng)
    if self.config.train.ema_decay:
      ema = optim.ema_update(ema, params, self.config.train.ema_decay)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, disc_params=disc_params,
        disc_state=disc_state, disc_opt_state=disc_opt_state, lecam_state=lecam_state,
        ema_params=ema, code_usage=code_usage)
    return new_state, metrics

  def _restart_dead_codes(self, params, ema, code_usage, codes, step, rng):
    """code_reset.restart_dead_codes on the codebook; a restarted row is also copied into the
    EMA params, which would otherwise keep averaging towards the dead row for many steps."""
    old = params["tokenizer"]["quantize"]["codebook"]
    new, code_usage, restarted = code_reset.restart_dead_codes(
        old, code_usage, codes["indices"], codes["z"], step, rng, self.config.code_reset)
    params = _with_codebook(params, new)
    if ema:
      moved = jnp.any(new != old, axis=-1, keepdims=True)
      ema = _with_codebook(ema, jnp.where(moved, new, ema["tokenizer"]["quantize"]["codebook"]))
    return params, ema, code_usage, restarted


def _with_codebook(params, codebook):
  quantize = dict(params["tokenizer"]["quantize"], codebook=codebook)
  return dict(params, tokenizer=dict(params["tokenizer"], quantize=quantize))
