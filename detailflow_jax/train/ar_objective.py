"""The AR (GPT) training objective and its jitted step: next-code cross-entropy.

The GPT reads the first N - g codes of the input sequence (plus the class token and the g - 1
special tokens) and predicts all N target codes; dropout and label dropout (for classifier-free
guidance) are active, with a fresh rng per step derived from the state's rng and step.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from detailflow_jax.models import gpt
from detailflow_jax.train import optim


@flax.struct.dataclass
class ARState:
  step: jax.Array
  params: dict            # the GPT params (inner tree)
  opt_state: optax.OptState
  ema_params: dict        # {} when EMA is off
  rng: jax.Array


def logged_groups(num_groups):
  """Groups whose accuracy is logged: the first two, quartiles and the last (at most 6),
  so a 64-group model does not write 64 curves."""
  return sorted({0, min(1, num_groups - 1), num_groups // 4, num_groups // 2,
                 3 * num_groups // 4, num_groups - 1})


def group_accuracies(logits, targets, group_size):
  """Top-1 accuracy of each group of `group_size` consecutive targets: (N / g,) float32."""
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return correct.reshape(correct.shape[0], -1, group_size).mean(axis=(0, 2))


class ARObjective:
  """Holds the GPT module and the optimizer; builds the state and the train step."""

  def __init__(self, config, gpt_config: gpt.GPTConfig):
    self.config = config
    self.gpt_config = gpt_config
    self.model = gpt.GPT(gpt_config)
    self.tx, self.lr_schedule = optim.adamw_with_schedule(
        config.optim, config.train.num_steps, config.data.batch_size)
    self.ema_decay = float(config.train.ema_decay)
    self.groups = logged_groups(gpt_config.block_size // gpt_config.group_size)

  def init_state(self, rng):
    """A fresh state (call under jit with out_shardings to place it). EMA starts as a copy of
    the params, as the reference's update_ema(decay=0)."""
    param_rng, state_rng = jax.random.split(rng)
    params = gpt.init_params(self.gpt_config, param_rng)
    return ARState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                   ema_params=params if self.ema_decay else {}, rng=state_rng)

  def loss_fn(self, params, batch, rng):
    logits = self.model.apply({"params": params}, batch["codes_input"], batch["labels"],
                              train=True, rngs={"dropout": rng})
    loss = gpt.next_code_loss(logits, batch["targets"])
    accuracy = group_accuracies(logits, batch["targets"], self.gpt_config.group_size)
    metrics = dict(loss=loss, accuracy=accuracy.mean())
    for g in self.groups:
      metrics[f"acc_group_{g}"] = accuracy[g]
    return loss, metrics

  def train_step(self, state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics = jax.grad(self.loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = self.lr_schedule(state.step)
    if "corrected" in batch:
      metrics["corrected_fraction"] = jnp.mean(batch["corrected"].astype(jnp.float32))
    ema = state.ema_params
    if self.ema_decay:
      ema = optim.ema_update(ema, params, self.ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics

  def tokens_per_step(self):
    return int(self.config.data.batch_size) * int(self.gpt_config.block_size)


def param_count(params):
  return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
