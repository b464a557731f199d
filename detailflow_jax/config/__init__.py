"""Configs: the building blocks of configs/*.py (`defaults`), the evaluation jobs' sections
(`eval_jobs`), and loading a config file and checking `--config.x=y` overrides (`files`)."""
