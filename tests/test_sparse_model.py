"""Block-sparse, hierarchical and sliding-window attention in the LM: equal to the
dense model where they must be, training with density metrics, config errors."""
import dataclasses

import jax
import numpy as np
import pytest
from conftest import records, tiny

from core.errors import ConfigError
from lm import config as config_lib
from lm import loop
from lm.model import apply, build_model


def _tiny(**model):
  """The tiny config at seq_len 64, with ``model.<a>.<b>`` overrides given as ``a__b``."""
  c = tiny(**{f"model__{k}": v for k, v in model.items()})
  c.data.seq_len = 64
  return c


def _logits(c, tokens):
  built = build_model(dataclasses.replace(config_lib.resolve(c).model, vocab_size=384), seed=0)
  return apply(built.graphdef, built.params, built.state, tokens)[:2]


def test_sparse_at_density_one_and_wide_hierarchical_equal_the_dense_model():
  tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 256)
  dense, stats = _logits(_tiny(), tokens)
  assert stats == {}
  full = _tiny(sparse__enabled=True, sparse__block_q=16, sparse__block_k=16, sparse__top_k=1.0)
  logits, stats = _logits(full, tokens)
  np.testing.assert_allclose(logits, dense, rtol=1e-5, atol=1e-5)
  assert all(float(s["density"]) == 1.0 for s in stats["attention"].values())
  wide = _tiny(hierarchical__block=16, hierarchical__local_blocks=4, attention_impl="blocked")
  np.testing.assert_allclose(_logits(wide, tokens)[0], dense, rtol=1e-5, atol=1e-5)
  # Sparser settings change the logits.
  sparse, stats = _logits(_tiny(sparse__enabled=True, sparse__block_q=16, sparse__block_k=16,
                                sparse__top_k=0.0, sparse__top_p=0.0, sparse__sink_blocks=0), tokens)
  assert float(np.abs(sparse - dense).max()) > 1e-3
  np.testing.assert_allclose([float(s["density"]) for s in stats["attention"].values()], 0.4)


@pytest.mark.parametrize("model", [
    dict(sparse__enabled=True, sparse__block_q=16, sparse__block_k=16, sparse__top_k=0.25,
         sparse__top_p=0.5),
    dict(hierarchical__block=16, hierarchical__local_blocks=1, attention_impl="blocked"),
    dict(sliding_window=24),
], ids=["block_sparse", "hierarchical", "sliding_window"])
def test_trains_and_logs_density(model, tmp_path):
  c = _tiny(**model)
  c.train.steps, c.train.log_every, c.train.eval_every = 12, 4, 12
  c.train.checkpoint_every, c.train.plot = 12, False
  out = loop.run(c, str(tmp_path))
  assert out["eval_loss"] < 5.5  # byte vocabulary: ln(256) = 5.55 at chance
  lines = records(str(tmp_path))
  dens = [x["attention/density"] for x in lines if "attention/density" in x]
  if "sparse__enabled" in model:
    assert dens and all(0.3 < d < 1.0 for d in dens)
  else:
    assert not dens


@pytest.mark.parametrize("field,value,match", [
    ("sparse__block_q", 48, "model.sparse.block_q=48.*does not divide data.seq_len=64"),
    ("sparse__top_p", 1.5, "model.sparse.top_p=1.5: out of range"),
    ("sparse__top_k", -0.5, "model.sparse.top_k=-0.5: out of range"),
    ("hierarchical__block", 24, "model.hierarchical.block=24: must divide data.seq_len=64"),
])
def test_config_errors(field, value, match):
  c = _tiny(**{"sparse__enabled": True, "sparse__block_q": 16, "sparse__block_k": 16,
               field: value})
  if field.startswith("hierarchical"):
    c.model.sparse.enabled = False
  with pytest.raises(ConfigError, match=match):
    config_lib.resolve(c)
  c = _tiny(sparse__enabled=True, hierarchical__block=16)
  with pytest.raises(ConfigError, match="hierarchical attention excludes model.sparse.enabled"):
    config_lib.resolve(c)
  c = _tiny(hierarchical__block=16, attention_impl="pallas")
  with pytest.raises(ConfigError, match="model.attention_impl='pallas'.*blocked and xla"):
    config_lib.resolve(c)
