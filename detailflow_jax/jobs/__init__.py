"""Jobs that are not training loops (code extraction, evaluation, sampling): (config, workdir)."""
