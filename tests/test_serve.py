"""The demo server (detailflow_jax/serve): request checks, the event stream, and the page in a
real browser (headless Chromium from Debian's chromium + chromium-driver, driven by selenium).

The server runs in this process on a free localhost port, with a tiny tokenizer + GPT pair
written as the training jobs write their workdirs (config.json + an orbax checkpoint of the
train state), so the server loads them exactly as it loads workdirs/default/{tokenizer,ar}.
"""
import json
import os
import pathlib
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

from detailflow_jax.config import files
from detailflow_jax.data import fashion_mnist
from detailflow_jax.models import gpt as gpt_model
from detailflow_jax.models import tokenizer as tokenizer_model
from detailflow_jax.serve import demo as demo_lib
from detailflow_jax.serve import server as server_lib
from detailflow_jax.train import checkpoints
from scripts import demo_browser as browsers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TOKENS = 16   # stages 1, 2, 3, 4, 8, 12, 16: few compiled decodes
STAGES = [1, 2, 3, 4, 8, 12, 16]


def _save_workdir(workdir, config, state):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort())
  saver = checkpoints.Checkpointer(workdir)
  saver.save(1, state)
  saver.close()


def _random_params(init, seed):
  """Params of init()'s shapes drawn N(0, 0.5) with numpy: no model compilation (seconds on
  two cores); the output is noise either way, and the drawn GPT head makes classes and seeds
  sample different codes."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype),
                                jax.eval_shape(init))


@pytest.fixture(scope="session")
def demo_workdirs(tmp_path_factory):
  """(tokenizer workdir, AR workdir) of a tiny Fashion-MNIST pair with random weights."""
  root = tmp_path_factory.mktemp("demo_workdirs")
  tok_config = files.load_config_file(str(REPO_ROOT / "configs" / "tokenizer_tiny.py:smoke"))
  tok_config.tokenizer.num_tokens = NUM_TOKENS
  params = _random_params(
      lambda: tokenizer_model.init_params(tok_config.tokenizer, jax.random.PRNGKey(0)), 0)
  _save_workdir(root / "tokenizer", tok_config,
                dict(step=np.int32(1), params=dict(tokenizer=params), ema_params={}))
  ar_config = files.load_config_file(str(REPO_ROOT / "configs" / "ar_tiny.py:smoke"))
  ar_config.gpt.block_size = NUM_TOKENS
  ar_config.gpt.num_layers = 1
  gcfg = gpt_model.GPTConfig.from_dict(ar_config.gpt.to_dict())
  gpt_params = _random_params(lambda: gpt_model.init_params(gcfg, jax.random.PRNGKey(1)), 1)
  _save_workdir(root / "ar", ar_config,
                dict(step=np.int32(1), params=gpt_params, ema_params=gpt_params))
  return root / "tokenizer", root / "ar"


@pytest.fixture(scope="session")
def demo(demo_workdirs):
  demo = demo_lib.Demo.from_workdirs(*map(str, demo_workdirs), cfg_scale=2.0)
  demo.warm()
  return demo


@pytest.fixture(scope="session")
def server_url(demo):
  server = server_lib.make_server(demo, "127.0.0.1", 0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_port}"
  server.shutdown()
  server.server_close()


def get(url):
  """(status, body bytes) of a GET, 4xx/5xx included."""
  try:
    with urllib.request.urlopen(url, timeout=60) as response:
      return response.status, response.read()
  except urllib.error.HTTPError as error:
    return error.code, error.read()


def generate_url(base, **params):
  query = dict({"class": "Sneaker", "cfg": "2", "temperature": "1", "seed": "0", "size": "32"},
               **params)
  return f"{base}/api/generate?{urllib.parse.urlencode(query)}"


def parse_events(body):
  events = []
  for block in body.decode().strip().split("\n\n"):
    lines = dict(line.split(": ", 1) for line in block.split("\n"))
    events.append((lines["event"], json.loads(lines["data"])))
  return events


def test_class_names_and_info(demo):
  assert demo.class_names == list(fashion_mnist.CLASS_NAMES)
  info = demo.info()
  assert info["sizes"] == [32] and info["defaults"]["cfg"] == 2.0
  assert [s["num_tokens"] for s in info["stages"]] == STAGES
  assert info["stages"][-1]["resolution"] == 32


BAD_REQUESTS = [
    ({"class": "Unicorn"}, "unknown class 'Unicorn'; choose one of: T-shirt/top, Trouser"),
    ({"class": ""}, "choose a class"),
    (dict(size="64"), "image size 64 is not supported by this tokenizer; supported sizes: 32"),
    (dict(size="big"), "size must be an integer, got 'big'"),
    (dict(cfg="abc"), "cfg must be a number, got 'abc'"),
    (dict(cfg="nan"), "cfg must be a finite number"),
    (dict(cfg="-1"), "cfg must be between 0 and 20"),
    (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
    (dict(seed="1.5"), "seed must be an integer, got '1.5'"),
    (dict(steps="3"), "unknown parameter 'steps'"),
]


@pytest.mark.parametrize("params,message", BAD_REQUESTS)
def test_bad_requests_get_400_with_a_message(demo, params, message):
  query = dict({"class": "Sneaker", "cfg": "2", "temperature": "1", "seed": "0", "size": "32"},
               **params)
  with pytest.raises(demo_lib.BadRequest, match="^" + message.replace("(", r"\(")):
    demo.parse(query)


def test_parse_accepts_names_indices_and_defaults(demo):
  request = demo.parse({"class": "sneaker"})
  assert (request.label, request.class_name) == (7, "Sneaker")
  assert (request.cfg_scale, request.temperature, request.seed, request.image_size) == (2.0, 1.0, 0, 32)
  assert demo.parse({"class": "3", "cfg": " 1.5 ", "seed": "12"}).label == 3


def test_stream_over_http(server_url):
  status, body = get(generate_url(server_url, **{"class": "Bag", "seed": "4"}))
  assert status == 200
  events = parse_events(body)
  assert [name for name, _ in events] == ["preview"] * len(STAGES)
  assert [e["num_tokens"] for _, e in events] == STAGES
  assert [e["final"] for _, e in events] == [False] * (len(STAGES) - 1) + [True]
  assert events[-1][1]["filename"] == "detailflow-bag-seed4-cfg2.png"
  assert events[-1][1]["png"].startswith("data:image/png;base64,")
  for name, params, message in [("unknown class", {"class": "Unicorn"}, "unknown class"),
                                ("unsupported size", {"size": "64"}, "supported sizes: 32"),
                                ("non-numeric CFG", {"cfg": "abc"}, "cfg must be a number")]:
    status, body = get(generate_url(server_url, **params))
    assert status == 400, name
    assert message in json.loads(body)["error"], name
  assert get(f"{server_url}/nowhere")[0] == 404
  assert get(f"{server_url}/api/info")[0] == 200   # still serving


def test_a_client_leaving_mid_stream_frees_the_server(server_url):
  host, port = urllib.parse.urlsplit(server_url).netloc.split(":")
  path = generate_url("", seed="9")
  with socket.create_connection((host, int(port)), timeout=60) as connection:
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert b"200 OK" in connection.recv(256)
  status, body = get(generate_url(server_url, seed="9"))   # the next generation is not blocked
  assert status == 200 and len(parse_events(body)) == len(STAGES)


@pytest.fixture(scope="module")
def browser():
  if not browsers.chromium_available():
    pytest.skip(f"Chromium not found at {browsers.CHROMIUM} / {browsers.CHROMEDRIVER} "
                "(apt-get install chromium chromium-driver, as launch/setup.sh test does)")
  driver = browsers.chromium()
  yield driver
  driver.quit()


def test_page_in_headless_chromium(browser, server_url, tmp_path):
  browsers.open_page(browser, server_url + "/")
  options = browser.execute_script(
      "return [...document.querySelectorAll('#class-names option')].map(o => o.value)")
  assert options == list(fashion_mnist.CLASS_NAMES)
  assert browser.execute_script("return [...document.getElementById('size').options]"
                                ".map(o => o.value)") == ["32"]

  # One image per class; every stage arrives, in order, the previews before the final image.
  streamed = 0
  for label, name in enumerate(fashion_mnist.CLASS_NAMES):
    page = browsers.generate_and_wait(browser, **{"class": name, "seed": str(label)})
    assert page["error"] is None, (name, page["error"])
    assert page["final"] and page["finalGeneration"] == page["generation"], name
    stages = page["stages"]
    assert [s["n"] for s in stages] == STAGES, name
    received = [s["received"] for s in stages]
    assert received == sorted(received), name
    expected = "detailflow-" + "-".join(name.lower().replace("/", " ").split()) + f"-seed{label}-cfg2.png"
    assert page["download"] == expected
    # Streamed: the first preview reached the page in an earlier network read than the final
    # image, or before the server had even sampled the last stage. A server that buffered the
    # response fails this for every class; a browser stalled by a busy machine may for a few.
    first, last = stages[0], stages[-1]
    streamed += first["read"] < last["read"] or first["received"] < last["sent"]
  assert streamed >= len(fashion_mnist.CLASS_NAMES) // 2, streamed
  browser.save_screenshot(str(tmp_path / "demo.png"))
  if os.environ.get("DETAILFLOW_DEMO_SCREENSHOT"):
    shutil.copy(tmp_path / "demo.png", os.environ["DETAILFLOW_DEMO_SCREENSHOT"])
  assert (tmp_path / "demo.png").stat().st_size > 10_000

  # Bad input: the server's message on the page (and a 400), then the page works again.
  for values, message in [({"class": "Unicorn"}, "Error 400: unknown class 'Unicorn'"),
                          ({"class": "Coat", "cfg": "abc"}, "Error 400: cfg must be a number"),
                          ({"cfg": "2", "temperature": "-3"}, "Error 400: temperature must be")]:
    page = browsers.generate_and_wait(browser, **values)
    assert page["error"] and page["error"].startswith(message), (values, page["error"])
    assert not page["final"] and page["stages"] == []
  browser.execute_script("const o = document.createElement('option'); o.value = o.textContent = "
                         "'64'; document.getElementById('size').appendChild(o);")
  page = browsers.generate_and_wait(browser, temperature="1", size="64")
  assert page["error"] == ("Error 400: image size 64 is not supported by this tokenizer; "
                           "supported sizes: 32")
  page = browsers.generate_and_wait(browser, size="32")
  assert page["error"] is None and page["final"] and len(page["stages"]) == len(STAGES)
