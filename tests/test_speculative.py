"""lm/decode/speculative.py and drafts: greedy speculative output equals plain greedy for
every draft kind, rejection sampling preserves the target's distribution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import MIXERS, decodable, model_cfg

from lm import decode
from lm.decode import drafts, speculative
from lm.decode.sampling import Sampling


@pytest.mark.parametrize("mixer,draft,expect", [
    ("softmax", "layers:2", "all"), ("softmax", "sparse", None), ("softmax", "quant:int4g16", None),
    ("hybrid", "layers:1", None), ("sliding_window", "random", "few"), ("2mamba", "layers:2", "all"),
    ("qkv_conv", "random", "few"),  # rejected drafts must not stay in the conv's inputs
])
def test_speculative_greedy_equals_plain_greedy(mixer, draft, expect):
  cfg = model_cfg(**MIXERS[mixer])
  _, target = decodable(cfg)
  if draft == "random":
    d = decodable(cfg, seed=7)[1]
  else:
    d = drafts.make(draft, target)
  prompts = [[5, 6, 7], [9] * 8, [1, 2, 3, 4, 5]]
  plain = decode.Decoder(target, max_len=40, cache_dtype="float32").generate(
      decode.Request(prompts, 14))
  spec = speculative.Speculative(target, d, gamma=3, max_len=40, cache_dtype="float32")
  got = spec.generate(decode.Request(prompts, 14))
  assert got["tokens"] == plain["tokens"]
  if expect == "all":
    assert got["acceptance_rate"] == 1.0 and got["alpha"] == 1.0
    assert got["tokens_per_target_call"] > 3.0
  elif expect == "few":
    assert got["acceptance_rate"] < 0.3 and got["alpha"] < 0.5
  assert 1.0 <= got["tokens_per_target_call"] <= 4.0


def test_rejection_sampling_preserves_the_target_distribution():
  """First emitted token over 40k seeded draws: chi-square against the target's p."""
  rng = np.random.default_rng(0)
  V, G, B = 6, 2, 40_000
  p = rng.dirichlet(np.ones(V), size=G + 1).astype(np.float32)
  q = rng.dirichlet(np.ones(V) * 0.5, size=G).astype(np.float32)
  s = Sampling(temperature=1.0)
  keys = jax.random.split(jax.random.key(1), B * (G + 1)).reshape(B, G + 1)
  d = jax.vmap(lambda k: jax.vmap(lambda kk, qq: jax.random.categorical(kk, jnp.log(qq)))(
      k[:G], jnp.asarray(q)))(keys)
  pB, qB = (jnp.broadcast_to(jnp.asarray(x), (B,) + x.shape) for x in (p, q))
  ukeys = jax.vmap(lambda k: jax.vmap(lambda kk: jax.random.fold_in(kk, 9))(k[:G]))(keys)
  n_acc, extra = speculative.accept(pB, qB, d.astype(jnp.int32), s, ukeys)
  first = np.where(np.asarray(n_acc) > 0, np.asarray(d[:, 0]), np.asarray(extra))
  counts = np.bincount(first, minlength=V)
  chi2 = float(np.sum((counts - B * p[0]) ** 2 / (B * p[0])))
  assert chi2 < 20.5, (chi2, counts / B, p[0])  # chi-square 5 dof: P(> 20.5) = 0.001
  # second token given the first was accepted follows p[1] likewise
  second = np.where(np.asarray(n_acc) > 1, np.asarray(d[:, 1]), np.asarray(extra))
  sel = np.asarray(n_acc) >= 1
  c2 = np.bincount(second[sel], minlength=V)
  chi2 = float(np.sum((c2 - sel.sum() * p[1]) ** 2 / (sel.sum() * p[1])))
  assert chi2 < 20.5, chi2
  # acceptance rate matches sum_x min(p, q) for the first proposal
  np.testing.assert_allclose(float(np.mean(np.asarray(n_acc) > 0)),
                             float(np.minimum(p[0], q[0]).sum()), atol=0.01)


def test_speculative_sampling_runs_and_is_reproducible():
  cfg = model_cfg()
  _, target = decodable(cfg)
  spec = speculative.Speculative(target, drafts.make("layers:1", target), gamma=2, max_len=40,
                                 cache_dtype="float32")
  s = Sampling(temperature=1.0, seed=5)
  a = spec.generate(decode.Request([[1, 2, 3], [4]], 15, s))
  b = spec.generate(decode.Request([[1, 2, 3], [4]], 15, s))
  assert a["tokens"] == b["tokens"] and all(len(t) == 15 for t in a["tokens"])
  assert 0.0 <= a["acceptance_rate"] <= 1.0


def test_draft_errors():
  from core.errors import ConfigError
  _, target = decodable(model_cfg())
  with pytest.raises(ConfigError, match="layers:N with 1 <= N <= 2"):
    drafts.make("layers:3", target)
  with pytest.raises(ConfigError, match="neither a draft kind"):
    drafts.make("nonsense", target)
  _, linear = decodable(model_cfg(**MIXERS["ssd"]))
  with pytest.raises(ConfigError, match="no softmax attention"):
    drafts.make("sparse", linear)
  with pytest.raises(ConfigError, match=r"--draft='quant:int3': not a weight type"):
    drafts.make("quant:int3", target)
  with pytest.raises(ConfigError, match=r"--draft='quant:int4g48': .*does not divide"):
    drafts.make("quant:int4g48", target)


