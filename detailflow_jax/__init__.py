"""DetailFlow in JAX/Flax: coarse-to-fine 1D tokenizer and group-parallel GPT.

    tokenizer = load_tokenizer(tokenizer_workdir)
    codes = encode(tokenizer, images); coarse = decode(tokenizer, codes, num_tokens=8)
    params = load_sampler_params(tokenizer_workdir, gpt_workdir)
    images = sample(params, labels, rng=jax.random.PRNGKey(0), cfg_scale=1.5)
    fast = sample(in_bfloat16(params), labels, rng=jax.random.PRNGKey(0))  # bfloat16 GPT
    for stage in sample_progressive(params, labels, rng=jax.random.PRNGKey(0)):
      show(stage.images)   # at R(stage.num_tokens), coarse to fine; the last equals sample()
    small = sample(params, labels, rng=jax.random.PRNGKey(0), image_size=16)  # any-resolution
"""
from detailflow_jax.api import Preview
from detailflow_jax.api import SamplerParams
from detailflow_jax.api import TokenizerParams
from detailflow_jax.api import decode
from detailflow_jax.api import encode
from detailflow_jax.api import generate_codes
from detailflow_jax.api import in_bfloat16
from detailflow_jax.api import in_decoding_layout
from detailflow_jax.api import load_sampler_params
from detailflow_jax.api import load_tokenizer
from detailflow_jax.api import sample
from detailflow_jax.api import sample_progressive
from detailflow_jax.api import supported_image_sizes
from detailflow_jax.api import token_count_for_size
from detailflow_jax.api import tokenizer_params

__all__ = ["Preview", "SamplerParams", "TokenizerParams", "decode", "encode", "generate_codes",
           "in_bfloat16", "in_decoding_layout", "load_sampler_params", "load_tokenizer", "sample",
           "sample_progressive", "supported_image_sizes", "token_count_for_size",
           "tokenizer_params"]
