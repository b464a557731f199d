"""The demo web page: python -m detailflow_jax.serve --tokenizer=DIR --gpt=DIR (docs/demo.md)."""
