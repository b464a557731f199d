"""DetailFlow in JAX/Flax: coarse-to-fine 1D tokenizer and group-parallel GPT."""
