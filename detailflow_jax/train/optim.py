"""Optimizers and schedules (optax)."""
import jax
import optax


def warmup_cosine(peak, total_steps, warmup_steps, end_value):
  warmup_steps = max(0, min(int(warmup_steps), int(total_steps) - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup_steps else peak, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(int(total_steps), warmup_steps + 1), end_value=end_value)


def scaled_learning_rate(optim_config, batch_size):
  lr = optim_config.learning_rate
  return lr * batch_size / 256 if optim_config.scale_lr_by_batch else lr


def adam_with_schedule(optim_config, total_steps, batch_size, learning_rate=None):
  """Adam(b1, b2) with warm-up + cosine to min_learning_rate and global-norm clipping."""
  peak = scaled_learning_rate(optim_config, batch_size) if learning_rate is None else learning_rate
  schedule = warmup_cosine(peak, total_steps, optim_config.warmup_steps,
                           min(optim_config.min_learning_rate, peak))
  return optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip),
      optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2)), schedule


def matrices_only(params):
  """Weight-decay mask: decay kernels and embeddings (ndim >= 2), not norms or biases."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def adamw_with_schedule(optim_config, total_steps, batch_size):
  """AdamW with decay on matrices only, warm-up fraction + cosine, clipping (AR training)."""
  peak = scaled_learning_rate(optim_config, batch_size)
  warmup = int(optim_config.warmup_fraction * total_steps) if optim_config.get(
      "warmup_fraction") is not None else optim_config.warmup_steps
  schedule = warmup_cosine(peak, total_steps, warmup, peak * optim_config.final_lr_fraction)
  return optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                  weight_decay=optim_config.weight_decay, mask=matrices_only)), schedule


def ema_update(ema_params, params, decay):
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
