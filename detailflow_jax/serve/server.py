"""The demo's HTTP server (standard library ThreadingHTTPServer, no framework).

  GET /                  the page (page.html beside this file: plain HTML + JS, no build step)
  GET /api/info          classes, supported sizes, defaults, the stages (n, R(n)) as JSON
  GET /api/generate?class=..&cfg=..&temperature=..&seed=..&size=..
                         a server-sent event stream: one `preview` event per stage (JSON with
                         the PNG as a data URL, n, R(n), the decoder size), the last one marked
                         final; bad parameters get 400 and {"error": message} instead

The page reads the stream with fetch() rather than EventSource, which cannot see a 400's
message. Each request runs in its own thread; generations take turns (Demo holds a lock), and a
client that goes away mid-stream ends its generation without disturbing the server.
"""
import http.server
import json
import pathlib
import urllib.parse

from absl import logging

from detailflow_jax.serve import demo as demo_lib

PAGE = pathlib.Path(__file__).with_name("page.html")


class Handler(http.server.BaseHTTPRequestHandler):
  server_version = "detailflow-demo"
  demo: demo_lib.Demo = None   # set by make_server on a subclass

  def do_GET(self):  # pylint: disable=invalid-name
    url = urllib.parse.urlsplit(self.path)
    if url.path in ("/", "/index.html"):
      self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
    elif url.path == "/api/info":
      self._send_json(200, self.demo.info())
    elif url.path == "/api/generate":
      self._generate(url.query)
    else:
      self._send_json(404, {"error": f"no such page: {url.path}"})

  def _generate(self, query_string):
    pairs = urllib.parse.parse_qs(query_string, keep_blank_values=True)
    repeated = sorted(k for k, v in pairs.items() if len(v) > 1)
    try:
      if repeated:
        raise demo_lib.BadRequest(f"parameter {repeated[0]!r} given more than once")
      request = self.demo.parse({k: v[0] for k, v in pairs.items()})
    except demo_lib.BadRequest as error:
      self._send_json(400, {"error": str(error)})
      return
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream; charset=utf-8")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("X-Accel-Buffering", "no")
    self.end_headers()
    events = self.demo.generate(request)
    try:
      for event in events:
        self._write_event("preview", event)
    except (BrokenPipeError, ConnectionResetError):
      logging.info("client went away during %s", request)
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("generation failed for %s", request)
      try:
        self._write_event("error", {"error": f"generation failed: {error}"})
      except OSError:
        pass
    finally:
      events.close()   # releases the generation lock at once if the client left early

  def _write_event(self, name, payload):
    self.wfile.write(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode())
    self.wfile.flush()

  def _send_json(self, status, payload):
    self._send(status, json.dumps(payload).encode(), "application/json")

  def _send(self, status, body, content_type):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-cache")
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.info("%s %s", self.address_string(), format % args)


def make_server(demo, host="127.0.0.1", port=8000):
  """A ThreadingHTTPServer serving `demo` (port 0: any free port; see server.server_port)."""
  handler = type("DemoHandler", (Handler,), {"demo": demo})
  server = http.server.ThreadingHTTPServer((host, port), handler)
  server.daemon_threads = True
  return server
