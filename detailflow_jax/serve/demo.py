"""What the demo page asks for, checked, and the stream of previews it gets back.

Kept apart from the HTTP layer (server.py) so that the parsing rules and the events can be
tested without a socket. A request names a class (its name or its index), a guidance scale, a
temperature, a seed and an image size; every bad value is a BadRequest whose message the page
shows as is. Generation yields one event per stage of api.sample_progressive: the PNG decoded
from the first n tokens, with n, R(n) and the decoder size.
"""
import base64
import dataclasses
import io
import math
import re
import threading
import time
from typing import Iterator, Sequence

import jax
import numpy as np
from PIL import Image

from detailflow_jax import api
from detailflow_jax import detail
from detailflow_jax import images as image_io
from detailflow_jax.jobs import sample as sample_job

PARAMETERS = ("class", "cfg", "temperature", "seed", "size")
MAX_CFG = 20.0
MAX_TEMPERATURE = 10.0
MAX_SEED = 2**31 - 1


class BadRequest(ValueError):
  """A request the server refuses (HTTP 400); str(error) is the message for the page."""


@dataclasses.dataclass(frozen=True)
class Request:
  label: int
  class_name: str
  cfg_scale: float
  temperature: float
  seed: int
  image_size: int


def _number(query, name, default, low, high, kind=float):
  text = query.get(name, "")
  text = str(default) if text.strip() == "" else text.strip()
  what = "an integer" if kind is int else "a number"
  try:
    value = kind(text)
  except ValueError:
    raise BadRequest(f"{name} must be {what}, got {text[:40]!r}") from None
  if isinstance(value, float) and not math.isfinite(value):
    raise BadRequest(f"{name} must be a finite number, got {text[:40]!r}")
  if not low <= value <= high:
    raise BadRequest(f"{name} must be between {low:g} and {high:g}, got {value:g}")
  return value


def png_data_url(image):
  """float HWC in [-1, 1] -> 'data:image/png;base64,...' of its uint8 PNG."""
  buffer = io.BytesIO()
  Image.fromarray(image_io.to_uint8(image)).save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def download_name(request):
  name = re.sub(r"[^A-Za-z0-9]+", "-", request.class_name).strip("-").lower() or "class"
  return f"detailflow-{name}-seed{request.seed}-cfg{request.cfg_scale:g}.png"


class Demo:
  """A loaded tokenizer + GPT pair and the settings the page offers."""

  def __init__(self, params: api.SamplerParams, class_names: Sequence[str], *, cfg_scale=2.0,
               temperature=1.0, seed=0):
    if len(class_names) != params.gpt_config.num_classes:
      raise ValueError(f"{len(class_names)} class names for a GPT of "
                       f"{params.gpt_config.num_classes} classes")
    self.params = params
    self.class_names = list(class_names)
    self.sizes = api.supported_image_sizes(params.tokenizer.config)
    self.defaults = dict(cfg=float(cfg_scale), temperature=float(temperature), seed=int(seed),
                         size=self.sizes[-1])
    self._lock = threading.Lock()   # one generation at a time: they share the CPU/accelerator

  @classmethod
  def from_workdirs(cls, tokenizer_workdir, gpt_workdir, **defaults):
    """The pair trained in these workdirs; class names from the tokenizer's data source
    (Fashion-MNIST names, else the class indices)."""
    params = api.load_sampler_params(tokenizer_workdir, gpt_workdir)
    names = sample_job.class_names(sample_job.tokenizer_data_source(tokenizer_workdir),
                                   params.gpt_config.num_classes)
    return cls(params, names, **defaults)

  def info(self):
    """What the page needs to build its form (served as /api/info)."""
    schedule = detail.resolution_schedule(self.params.tokenizer.config)
    return dict(classes=self.class_names, sizes=list(self.sizes), defaults=self.defaults,
                num_tokens=self.params.gpt_config.block_size,
                stages=[dict(num_tokens=n, resolution=schedule.content_resolution(n))
                        for n in schedule.token_list],
                guidance=self.params.gpt_config.class_dropout_prob > 0)

  def parse(self, query) -> Request:
    """query: {name: value} (one value each) -> Request, or BadRequest saying what is wrong."""
    unknown = sorted(set(query) - set(PARAMETERS))
    if unknown:
      raise BadRequest(f"unknown parameter {unknown[0]!r}; the parameters are "
                       f"{', '.join(PARAMETERS)}")
    label = self._label(query.get("class", ""))
    cfg = _number(query, "cfg", self.defaults["cfg"], 0.0, MAX_CFG)
    if cfg != 1.0 and not self.params.gpt_config.class_dropout_prob > 0:
      raise BadRequest(f"cfg must be 1 for this model: it was trained without the null class "
                       f"that guidance needs, got {cfg:g}")
    temperature = _number(query, "temperature", self.defaults["temperature"], 0.0, MAX_TEMPERATURE)
    seed = _number(query, "seed", self.defaults["seed"], 0, MAX_SEED, kind=int)
    size = _number(query, "size", self.defaults["size"], 1, 1 << 16, kind=int)
    if size not in self.sizes:
      raise BadRequest(f"image size {size} is not supported by this tokenizer; supported sizes: "
                       f"{', '.join(map(str, self.sizes))}")
    return Request(label=label, class_name=self.class_names[label], cfg_scale=cfg,
                   temperature=temperature, seed=seed, image_size=size)

  def _label(self, text):
    text = text.strip()
    if not text:
      raise BadRequest("choose a class")
    lowered = [name.lower() for name in self.class_names]
    if text.lower() in lowered:
      return lowered.index(text.lower())
    if text.isdigit() and int(text) < len(self.class_names):
      return int(text)
    raise BadRequest(f"unknown class {text[:40]!r}; choose one of: {', '.join(self.class_names)}")

  def generate(self, request: Request) -> Iterator[dict]:
    """One event per stage: {num_tokens, total_tokens, resolution, decoder_size, png, final,
    elapsed_s, sent_at_ms}; the last one (final) also has a download file name. Holds the
    generation lock until the iterator is exhausted or closed."""
    with self._lock:
      start = time.perf_counter()
      previews = api.sample_progressive(
          self.params, np.array([request.label], np.int32), rng=jax.random.PRNGKey(request.seed),
          cfg_scale=request.cfg_scale, temperature=request.temperature,
          image_size=request.image_size)
      # The codes of an image of the requested size (all N at the tokenizer's own size).
      total = api.token_count_for_size(self.params.tokenizer.config, request.image_size)
      for preview in previews:
        image = np.asarray(preview.images)[0]
        event = dict(num_tokens=preview.num_tokens, total_tokens=total,
                     resolution=preview.resolution, decoder_size=preview.decoder_size,
                     png=png_data_url(image), final=preview.final,
                     elapsed_s=round(time.perf_counter() - start, 4),
                     sent_at_ms=int(time.time() * 1000))
        if preview.final:
          event["filename"] = download_name(request)
        yield event

  def warm(self):
    """Compiles every program a request runs (both guidance settings), so the first click is
    as quick as the next. Returns the seconds it took."""
    start = time.perf_counter()
    settings = {self.defaults["cfg"], 1.0} if self.params.gpt_config.class_dropout_prob > 0 else {1.0}
    for cfg in sorted(settings):
      request = Request(label=0, class_name=self.class_names[0], cfg_scale=cfg,
                        temperature=self.defaults["temperature"], seed=0,
                        image_size=self.defaults["size"])
      for _ in self.generate(request):
        pass
    return time.perf_counter() - start
