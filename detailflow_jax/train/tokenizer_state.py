"""Creating the tokenizer train state directly in its shardings."""
import jax

from detailflow_jax.train import finetune
from detailflow_jax.train import sharding


def create(config, objective, mesh):
  """Returns (state, abstract_state, shardings). Params are initialised inside jit with
  out_shardings, so no device ever holds an unsharded copy."""
  rng = jax.random.PRNGKey(config.seed)
  finetune.check(config)
  init_params = finetune.initial_tokenizer_params(config)
  if init_params is not None and config.loss.init_encoder_from_siglip:
    raise ValueError("finetune.from_workdir and loss.init_encoder_from_siglip both give the "
                     "initial params; set --config.loss.init_encoder_from_siglip=False")
  if config.loss.init_encoder_from_siglip:
    from detailflow_jax.models import siglip2  # pylint: disable=g-import-not-at-top
    init_params = siglip2.tokenizer_params_with_siglip_encoder(
        config.loss.siglip_weights, config.tokenizer, rng, config_key="loss.siglip_weights")
  # Pretrained init params are an argument, not a closure: as constants XLA would fold
  # hundreds of MB of weights into the program.
  abstract = jax.eval_shape(objective.init_state, rng, init_params)
  shardings = sharding.state_shardings(abstract, mesh, objective.param_logical_axes())
  state = jax.jit(objective.init_state, out_shardings=shardings)(rng, init_params)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return state, abstract, shardings
