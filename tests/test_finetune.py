"""Starting a tokenizer run from a trained one (train/finetune.py): a decoder-only run keeps
every frozen param bit for bit, and bad finetune settings are refused with a clear error."""
import jax
import numpy as np
import pytest
from absl import flags

from detailflow_jax import workdir_io
from detailflow_jax.train import tokenizer_trainer

from test_tokenizer_trainer import smoke_config


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, fake_fmnist_dir):
  flags.FLAGS.mark_as_parsed()
  workdir = str(tmp_path_factory.mktemp("from_scratch"))
  tokenizer_trainer.train_and_evaluate(smoke_config(fake_fmnist_dir, 2), workdir)
  return workdir


def finetune_config(fake_fmnist_dir, from_workdir, steps=2):
  config = smoke_config(fake_fmnist_dir, steps)
  config.finetune.from_workdir = from_workdir
  config.finetune.decoder_only = True
  config.code_reset.every = 0
  return config


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                  jax.tree_util.tree_leaves(b)))


def test_decoder_only_run_trains_the_decoder_and_freezes_the_rest(
    tmp_path, fake_fmnist_dir, trained_workdir):
  start = workdir_io.load_tokenizer(trained_workdir).params
  state = tokenizer_trainer.train_and_evaluate(
      finetune_config(fake_fmnist_dir, trained_workdir), str(tmp_path / "finetuned"))
  tuned = jax.device_get(state.params["tokenizer"])
  for name in ("encoder", "quant_conv", "quantize", "refine_conv"):
    assert leaves_equal(start[name], tuned[name]), f"{name} changed in a decoder-only run"
  for name in ("decoder", "post_quant_conv"):
    assert not leaves_equal(start[name], tuned[name]), f"{name} did not train"


def test_decoder_only_needs_a_workdir(tmp_path, fake_fmnist_dir):
  config = finetune_config(fake_fmnist_dir, "")
  with pytest.raises(ValueError, match="needs finetune.from_workdir"):
    tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "w"))


def test_decoder_only_refuses_code_restarts(tmp_path, fake_fmnist_dir, trained_workdir):
  config = finetune_config(fake_fmnist_dir, trained_workdir)
  config.code_reset.every = 10
  with pytest.raises(ValueError, match="code_reset.every=0"):
    tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "w"))


def test_another_architecture_is_named(tmp_path, fake_fmnist_dir, trained_workdir):
  config = finetune_config(fake_fmnist_dir, trained_workdir)
  config.tokenizer.codebook_size = 32
  with pytest.raises(ValueError, match="codebook_size: 64 there, 32 here"):
    tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "w"))


def test_resuming_on_a_retrained_tokenizer_is_refused(tmp_path, fake_fmnist_dir, trained_workdir):
  """The decoder of a decoder-only run belongs to its source's codes: once that source is
  another tokenizer (here: one trained with another seed), resuming must stop."""
  finetuned = str(tmp_path / "finetuned")
  tokenizer_trainer.train_and_evaluate(finetune_config(fake_fmnist_dir, trained_workdir, 2),
                                       finetuned)
  other = smoke_config(fake_fmnist_dir, 2)
  other.seed = 7
  retrained = str(tmp_path / "retrained")
  tokenizer_trainer.train_and_evaluate(other, retrained)
  with pytest.raises(ValueError, match="trained on other codes"):
    tokenizer_trainer.train_and_evaluate(finetune_config(fake_fmnist_dir, retrained, 4),
                                         finetuned)
  # Against its own source it resumes.
  state = tokenizer_trainer.train_and_evaluate(
      finetune_config(fake_fmnist_dir, trained_workdir, 4), finetuned)
  assert int(state.step) == 4
