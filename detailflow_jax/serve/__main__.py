"""python -m detailflow_jax.serve --tokenizer=DIR --gpt=DIR [--port=8000]: the demo page.

Loads a trained tokenizer + GPT pair (e.g. workdirs/default/decoder and workdirs/default/ar
from README command 1), compiles every program a request runs, then serves the page at
http://HOST:PORT/ until interrupted (docs/demo.md).
"""
from absl import app
from absl import flags
from absl import logging

from detailflow_jax import compilation_cache
from detailflow_jax.serve import demo as demo_lib
from detailflow_jax.serve import server as server_lib

_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer workdir (a tokenizer training run).")
_GPT = flags.DEFINE_string("gpt", None, "AR workdir (a GPT trained on that tokenizer's codes).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
# The default run's sampling setting (configs/default.py, chosen in docs/recipe.md).
_CFG = flags.DEFINE_float("cfg_scale", 2.0, "The page's default guidance scale.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "The page's default temperature.")
_WARM = flags.DEFINE_bool("warm", True, "Compile before serving, so the first click is quick.")
flags.mark_flags_as_required(["tokenizer", "gpt"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:   # orbax logs every restore at INFO; --verbosity=0
    logging.set_verbosity(logging.WARNING)   # shows them and one line per request
  compilation_cache.enable()
  try:
    demo = demo_lib.Demo.from_workdirs(_TOKENIZER.value, _GPT.value, cfg_scale=_CFG.value,
                                       temperature=_TEMPERATURE.value)
  except ValueError as error:   # not a workdir, no checkpoint, a mismatched pair: say which
    raise SystemExit(f"error: {error}") from None
  if _WARM.value:
    print("compiling the sampler and the decodes ...", flush=True)
    print(f"ready in {demo.warm():.1f} s", flush=True)
  server = server_lib.make_server(demo, _HOST.value, _PORT.value)
  host, port = server.server_address[:2]
  print(f"serving the DetailFlow demo at http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    logging.info("stopped")
  finally:
    server.server_close()


if __name__ == "__main__":
  app.run(main)
