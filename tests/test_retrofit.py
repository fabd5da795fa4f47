"""RETROfit on real databases: a trained baseline, retrofitted with `python -m retro_jax.retrofit`,
keeps every baseline weight bit-identical, and with retrieval off its logits equal the baseline's
bit for bit; the new CCA / encoder weights do train and do change the logits with retrieval on.
The slow test does the same for SmolLM2-135M (GGUF -> export_smollm2 -> one retrofit step).
"""
import dataclasses
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import corpus_path  # noqa: E402
import tiny_db  # noqa: E402

from retro_jax.model import SIZES, Retro  # noqa: E402
from retro_jax.model.partitioning import make_mesh  # noqa: E402
from retro_jax.training import checkpoint as ckpt_lib  # noqa: E402
from retro_jax.training import experiment  # noqa: E402
from retro_jax.training import input_pipeline as loader  # noqa: E402
from retro_jax.training.retrofit import (  # noqa: E402
  RETRIEVAL_PARAMS,
  RetrofitError,
  load_baseline_into,
)
from retro_jax.training.step import TrainStep  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")

# experiments/retrofit_tiny.py shrunk to the tiny database (SentencePiece vocab 1000, chunks 64).
TINY = {"model_overrides.vocab_size": 1024, "model_overrides.d_model": 32,
        "model_overrides.num_heads": 2, "model_overrides.num_layers": 3,
        "model_overrides.ffw_size": 64, "model_overrides.cca_layers": (2, 3),
        "model_overrides.encoder_d_model": 16, "model_overrides.encoder_num_heads": 1,
        "seq_len": 128, "global_batch": 2, "warmup_steps": 1, "checkpoint_every": 100,
        "log_every": 1, "read_threads": 1}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  return tiny_db.get(tmp_path_factory)[0]


def _config(module: str, db, **kw) -> ml_collections.ConfigDict:
  import importlib
  c = importlib.import_module(f"experiments.{module}").get_config()
  for k, v in {"db": str(db), **kw}.items():
    if k.startswith("model_overrides."):
      c.model_overrides[k.split(".", 1)[1]] = v
    else:
      setattr(c, k, v)
  return c


@pytest.fixture(scope="module")
def baseline(db, tmp_path_factory):
  """A tiny baseline trained 3 steps by the train command's run() (retrieval off)."""
  from retro_jax.training import loop as train
  wd = tmp_path_factory.mktemp("baseline")
  c = _config("retrofit_tiny", db, **TINY, retrieval=False, init_from="", train_only="all",
              total_steps=3, peak_lr=3e-3)
  train.run(c, str(wd), progress=False)
  return wd


@pytest.fixture(scope="module")
def retrofit(db, baseline, tmp_path_factory):
  """The retrofit command (a subprocess) on experiments/retrofit_tiny.py: 4 steps, high LR."""
  wd = tmp_path_factory.mktemp("retrofit")
  over = {**TINY, "db": str(db), "total_steps": 4, "peak_lr": 1e-2}
  cmd = [sys.executable, "-m", "retro_jax.retrofit", "--config=experiments/retrofit_tiny.py",
         f"--workdir={wd}", f"--config.init_from={baseline}"]
  cmd += [f"--config.{k}={v}" for k, v in over.items()]
  p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
  return wd


def _flat(model) -> dict:
  return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _logits(model, tokens, nbrs=None):
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t, n: nnx.merge(graphdef, s)(t, n))
  return np.asarray(fwd(state, jnp.asarray(tokens), None if nbrs is None else jnp.asarray(nbrs)))


def _batch(db, cfg, n=2, seq_len=128):
  src = loader.SequenceSource(db, seq_len, split="train", retrieval=True,
                              num_neighbours=cfg.num_neighbours, neighbour_len=cfg.neighbour_len)
  ex = [src[i] for i in range(n)]
  return np.stack([e["inputs"] for e in ex]), np.stack([e["neighbours"] for e in ex])


def _check_retrofit(base_model, base_cfg, ret_model, ret_cfg, tokens, nbrs, init_model=None):
  base, ret = _flat(base_model), _flat(ret_model)
  assert ret_cfg.retrieval and not base_cfg.retrieval
  assert set(base) < set(ret)
  for path, value in base.items():  # every baseline weight, bit for bit
    assert ret[path].dtype == value.dtype and np.array_equal(ret[path], value), path
  new = sorted(set(ret) - set(base))
  assert new and all(any(k in ("cca", "cca_norm", "encoder") for k in p) for p in new)
  if init_model is not None:  # the new weights did train
    init = _flat(init_model)
    moved = [p for p in new if not np.array_equal(ret[p], init[p])]
    assert len(moved) == len(new), sorted(set(new) - set(moved))[:5]
  off = _logits(ret_model, tokens)
  np.testing.assert_array_equal(off, _logits(base_model, tokens))  # retrieval off == baseline
  on = _logits(ret_model, tokens, nbrs)
  m = ret_cfg.chunk_size
  np.testing.assert_array_equal(on[:, :m - 1], off[:, :m - 1])  # no neighbour is visible yet
  assert np.abs(on[:, m - 1:] - off[:, m - 1:]).max() > 1e-4  # retrieval on does something


def test_retrofit_keeps_baseline_bit_identical(db, baseline, retrofit):
  base_model, base_cfg, _ = ckpt_lib.load_model(baseline)
  ret_model, ret_cfg, info = ckpt_lib.load_model(retrofit)
  assert info["step"] == 4 and ret_cfg.cca_layers == (2, 3)
  assert dataclasses.replace(ret_cfg, cca_layers=()) == base_cfg  # same decoder and encoder fields
  tokens, nbrs = _batch(db, ret_cfg)
  init_model = Retro(ret_cfg, rngs=nnx.Rngs(0))  # TrainStep's init (seed 0)
  _check_retrofit(base_model, base_cfg, ret_model, ret_cfg, tokens, nbrs, init_model)
  # The optimiser's state covers the new parameters only (Adam's mu and nu, plus counters).
  c = experiment.with_defaults(_config("retrofit_tiny", db, **TINY))
  ts = TrainStep(ret_cfg, experiment.optimizer(c), make_mesh((-1, 1, 1)), wrt=RETRIEVAL_PARAMS)
  opt_size = sum(math.prod(x.shape) for x in jax.tree.leaves(ts.abstract_state[1]))
  n_new = sum(v.size for p, v in _flat(ret_model).items() if p not in _flat(base_model))
  assert 2 * n_new <= opt_size < 2 * n_new + 100


def test_retrofit_refuses_a_different_decoder_or_a_retro_checkpoint(db, baseline, retrofit):
  c = experiment.with_defaults(_config("retrofit_tiny", db,
                                       **{**TINY, "model_overrides.d_model": 48}))
  cfg = experiment.model_config(c)
  state = (nnx.state(Retro(cfg, rngs=nnx.Rngs(0))),)
  with pytest.raises(RetrofitError, match="d_model"):
    load_baseline_into(state, cfg, str(baseline))
  with pytest.raises(RetrofitError, match="RETRO checkpoint"):
    load_baseline_into(state, cfg, str(retrofit))


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M: the registry matches the GGUF, the export loads back exactly, one retrofit step
# keeps it exact with retrieval off.

SMOL_CORPUS = corpus_path.spec(kernel=6, wiki=12)


@pytest.mark.slow
def test_smollm2_export_and_one_retrofit_step(tmp_path):
  from retro_jax.build import stages as build_db
  from retro_jax.pretrained import gguf, smollm2
  from retro_jax.training import loop as train
  smol_db = tmp_path / "smol_db"
  build_db.build(smol_db, corpus=SMOL_CORPUS, tokenizer="smollm2", heldout_fraction=0.1, k=2,
                 backend="exact", docs_per_shard=100)
  gguf_model, gguf_cfg, tok = gguf.load_smollm2()
  assert gguf_cfg == SIZES["smollm2-135m"]
  base_wd = tmp_path / "smollm2_baseline"
  smollm2.export(base_wd, db=str(smol_db))
  base_model, base_cfg, info = ckpt_lib.load_model(base_wd)
  assert info["step"] == 0 and info["db"] == str(smol_db) and base_cfg == gguf_cfg
  tokens = np.asarray([tok.encode("The Moon is Earth's only natural satellite. " * 12)[:128]],
                      np.int32)
  np.testing.assert_array_equal(_logits(base_model, tokens), _logits(gguf_model, tokens))

  ret_wd = tmp_path / "smollm2_retrofit"
  c = _config("retrofit_smollm2", smol_db, init_from=str(base_wd), seq_len=128, global_batch=1,
              total_steps=2, warmup_steps=1, read_threads=1, peak_lr=1e-3,
              **{"model_overrides.encoder_d_model": 64})
  train.run(c, str(ret_wd), progress=False)
  ret_model, ret_cfg, info = ckpt_lib.load_model(ret_wd)
  assert info["step"] == 2 and ret_cfg.cca_layers == (6, 9, 12, 15, 18, 21, 24, 27, 30)
  _, nbrs = _batch(smol_db, ret_cfg, n=1)
  _check_retrofit(base_model, base_cfg, ret_model, ret_cfg, tokens, nbrs)
