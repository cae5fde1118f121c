"""Pruning (lm/prune.py, experiments/prune.py): exact sparsity and N:M patterns against
numpy loops, the gradual schedule's targets at its steps, masks that hold through
training and kill-and-resume, the exported pruned run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import records, tiny

from core.errors import ConfigError
from experiments import evaluate
from experiments import prune as prune_cli
from lm import loop, prune, quant, runs
from lm.config import resolve
from lm.model import build_model


def _built(**kw):
  return build_model(resolve(tiny(model__vocab_size=256, **kw)).model, 0)


def hand_nm(w: np.ndarray, n: int, m: int) -> np.ndarray:
  """Loop over every group of m consecutive inputs (axis 0 of a 2-D [in, out] matrix):
  keep the n largest |w| (the earlier one on ties)."""
  keep = np.zeros(w.shape, bool)
  for j in range(w.shape[1]):
    for start in range(0, w.shape[0], m):
      group = np.abs(w[start:start + m, j])
      order = sorted(range(m), key=lambda i: (-group[i], i))
      for i in order[:n]:
        keep[start + i, j] = True
  return keep


def test_nm_mask_equals_loop_and_pattern_is_exact():
  built = _built(model__moe__num_experts=2, model__moe__top_k=1)
  mats = quant.matrices(built.axes["params"])
  for path in (("block_0", "attn", "q"), ("block_0", "attn", "o"), ("block_1", "mlp", "down")):
    m = mats[path]
    w = np.asarray(quant.get_path(built.params, path))
    keep = np.asarray(prune.nm_mask(jnp.asarray(w), m, 2, 4))
    shape, c = quant.merged_shape(w.shape, m)
    w2 = np.moveaxis(w.reshape(shape), c, -1)
    k2 = np.moveaxis(keep.reshape(shape), c, -1)
    lead = w2.shape[:-1]
    w2, k2 = w2.reshape(-1, w2.shape[-1]).T, k2.reshape(-1, k2.shape[-1]).T
    np.testing.assert_array_equal(k2, hand_nm(w2, 2, 4), err_msg=str(path))
    groups = k2.reshape(-1, 4, k2.shape[1]).sum(axis=1)
    assert np.all(groups == 2) and len(lead) >= 1


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9])
def test_magnitude_sparsity_is_exact(sparsity):
  built = _built(model__moe__num_experts=4, model__moe__top_k=2)
  mats = quant.matrices(built.axes["params"])
  for path, m in mats.items():
    w = np.asarray(quant.get_path(built.params, path))
    keep = np.asarray(prune.magnitude_mask(jnp.asarray(w), m, sparsity))
    if m.batch:  # each expert on its own
      for e in range(w.shape[0]):
        n = w[e].size
        assert (~keep[e]).sum() == int(np.floor(sparsity * n + 1e-6))
        assert np.abs(w[e][~keep[e]]).max(initial=0) <= np.abs(w[e][keep[e]]).min()
    else:
      assert (~keep).sum() == int(np.floor(sparsity * w.size + 1e-6))
      assert np.abs(w[~keep]).max(initial=0) <= np.abs(w[keep]).min()


def test_gradual_schedule_hits_its_targets_at_its_steps():
  cfg = prune.PruneConfig(method="magnitude", sparsity=0.8, schedule="gradual", begin=2,
                          end=10, every=4)
  built = _built()
  hook = prune.Prune(cfg, built.axes["params"])
  params, state = hook.init(built.params)
  update = jax.jit(hook.update)
  seen = {}
  for step in range(1, 14):
    params, state = update(params, state, jnp.int32(step))
    seen[step] = prune.sparsity_report(params, built.axes["params"], cfg.targets)
  q = ("block_0/attn/q")
  n = 64 * 64
  expected = lambda t: int(np.floor(0.8 * (1 - (1 - (t - 2) / 8) ** 3) * n + 1e-6)) / n
  assert seen[1][q] == 0.0 and seen[2][q] == 0.0  # the ramp starts at 0
  assert seen[5][q] == expected(2) == 0.0
  assert seen[6][q] == pytest.approx(expected(6)) and seen[9][q] == seen[6][q]
  assert seen[10][q] == pytest.approx(expected(10)) == pytest.approx(0.8, abs=1 / n)
  assert seen[13][q] == seen[10][q]


def test_pruned_weights_stay_zero_through_qat_training_and_resume(tmp_path):
  """Gradual magnitude pruning with int8 w8a8 quantization-aware training: a run killed
  at step 2 (mid-ramp) and resumed equals the uninterrupted one bitwise, learns, and its masks
  held (the realised sparsity is the target)."""
  kw = dict(train__steps=4, train__log_every=1, train__eval_every=4, train__checkpoint_every=2,
            prune__method="magnitude", prune__sparsity=0.6, prune__schedule="gradual",
            prune__begin=0, prune__end=3, prune__every=1, quant__weight="int8",
            quant__act="int8", quant__mode="qat")
  loop.run(tiny(**kw), str(tmp_path / "full"))
  loop.run(tiny(**kw), str(tmp_path / "split"), stop_at=2)
  loop.run(tiny(**kw), str(tmp_path / "split"))
  strip = lambda rs: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rs]
  assert strip(records(tmp_path / "full")) == strip(records(tmp_path / "split"))
  losses = [r["loss"] for r in records(tmp_path / "full") if "loss" in r]
  assert losses[-1] < losses[0]
  # evaluate reports the weights as the forward sees them (int8: a few more round to 0)
  per = evaluate.evaluate(str(tmp_path / "split"), eval_batches=1)["sparsity_per_matrix"]
  assert per["block_0/attn/q"] >= np.floor(0.6 * 4096) / 4096
  raw = {"quant.weight": "none", "quant.act": "none"}
  a = runs.load_weights(str(tmp_path / "full"), raw).params
  b = runs.load_weights(str(tmp_path / "split"), raw).params
  assert int((np.asarray(b["block_0"]["attn"]["q"]) == 0).sum()) == int(np.floor(0.6 * 4096))
  assert not np.any(np.asarray(b["head"]) == 0)  # not a target
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_prune_cli_exports_a_pruned_run(tmp_path):
  """(Fine-tuning it under the masks with ``train.init_from``: colab/compress.ipynb.)"""
  loop.run(tiny(train__steps=2, train__eval_every=2), str(tmp_path / "w"))
  r = prune_cli.prune(str(tmp_path / "w"), str(tmp_path / "p"), {"prune.method": "nm"})
  assert r["sparsity"]["all"] == 0.5 and r["step"] == 2
  w = np.asarray(runs.load_weights(str(tmp_path / "p")).params["block_1"]["mlp"]["down"])
  assert np.all((w.reshape(-1, 4, w.shape[1]) != 0).sum(axis=1) == 2)
  with pytest.raises(ConfigError, match=r"--out=.*exists and is not an empty folder"):
    prune_cli.prune(str(tmp_path / "w"), str(tmp_path / "p"), {"prune.method": "nm"})


def test_errors():
  with pytest.raises(ConfigError, match=r"prune.n=5: exceeds m=4"):
    resolve(tiny(prune__method="nm", prune__n=5))
  with pytest.raises(ConfigError, match=r"prune.sparsity=1.0: must be in \[0, 1\)"):
    resolve(tiny(prune__method="magnitude", prune__sparsity=1.0))
  with pytest.raises(ConfigError, match=r"prune.end=0: a gradual schedule needs end > begin"):
    resolve(tiny(prune__method="magnitude", prune__schedule="gradual"))
