"""Driving the demo page in Debian's headless Chromium (selenium): shared by tests/test_serve.py
and, run as a script, the screenshot in docs/demo.md:

  python tests/scripts/demo_browser.py --tokenizer=workdirs/default/decoder \
      --gpt=workdirs/default/ar --out=docs/images/demo.png --class_name=Sneaker --seed=0

The script starts the server in-process on a free localhost port (warmed as
`python -m detailflow_jax.serve` is), generates one image and saves a screenshot of the page.
"""
import argparse
import os
import pathlib
import sys
import threading

CHROMIUM = os.environ.get("DETAILFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DETAILFLOW_CHROMEDRIVER", "/usr/bin/chromedriver")

# What the page shows after a Generate press, read in one script call.
PAGE_STATE = """
  const stages = [...document.querySelectorAll('#stages .stage')].map(s => ({
      n: +s.dataset.numTokens, read: +s.dataset.read, received: +s.dataset.receivedMs,
      sent: +s.dataset.sentMs}));
  const shown = (id) => getComputedStyle(document.getElementById(id)).display !== 'none';
  const final = document.getElementById('final');
  return {stages, error: shown('error') ? document.getElementById('error').textContent : null,
          final: shown('final'),
          finalGeneration: +final.dataset.generation, generation,
          download: document.getElementById('download').getAttribute('download')};
"""


def chromium_available():
  return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


def chromium(width=1100, height=900):
  """A headless Chromium webdriver (Debian's chromium and chromium-driver)."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}"):
    options.add_argument(arg)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait(browser, condition, timeout):
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  return WebDriverWait(browser, timeout).until(condition)


def open_page(browser, url, timeout=30):
  """Loads the page and waits until it has read /api/info (Generate enabled)."""
  browser.get(url)
  wait(browser, lambda b: not b.find_element("id", "generate").get_attribute("disabled"), timeout)


def fill(browser, **values):
  """Sets form fields by id: typed into inputs, assigned to selects."""
  for field, value in values.items():
    element = browser.find_element("id", field)
    if element.tag_name == "select":
      browser.execute_script("arguments[0].value = arguments[1]", element, value)
    else:
      element.clear()
      element.send_keys(value)


def generate_and_wait(browser, timeout=60, **values):
  """Fills the form, presses Generate, waits until that generation ended (final image or error)
  and returns PAGE_STATE."""
  before = browser.execute_script("return generation")
  fill(browser, **values)
  browser.find_element("id", "generate").click()
  wait(browser, lambda b: b.execute_script("return generation > arguments[0] && !running", before),
       timeout)
  return browser.execute_script(PAGE_STATE)


def main():
  parser = argparse.ArgumentParser(description="Screenshot of the demo page after one generation.")
  parser.add_argument("--tokenizer", required=True)
  parser.add_argument("--gpt", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--class_name", default="Sneaker")
  parser.add_argument("--seed", default="0")
  parser.add_argument("--cfg_scale", type=float, default=2.0)
  args = parser.parse_args()
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from detailflow_jax.serve import demo as demo_lib  # pylint: disable=g-import-not-at-top
  from detailflow_jax.serve import server as server_lib  # pylint: disable=g-import-not-at-top
  demo = demo_lib.Demo.from_workdirs(args.tokenizer, args.gpt, cfg_scale=args.cfg_scale)
  demo.warm()
  server = server_lib.make_server(demo, "127.0.0.1", 0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  browser = chromium(1100, 780)
  try:
    open_page(browser, f"http://127.0.0.1:{server.server_port}/")
    page = generate_and_wait(browser, **{"class": args.class_name, "seed": args.seed})
    if page["error"] or not page["final"]:
      raise SystemExit(f"generation failed on the page: {page['error']}")
    browser.save_screenshot(args.out)
    print(f"wrote {args.out}: {len(page['stages'])} stages")
  finally:
    browser.quit()
    server.shutdown()


if __name__ == "__main__":
  main()
