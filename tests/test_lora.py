"""LoRA / QLoRA (lm/lora.py, experiments/export.py): the merged weight against the
unmerged x W + s (x A) B on every adapted matrix (forward and gradients), the base at
initialisation, only adapters training and checkpointed, one device against eight,
kill-and-resume, the exported merged run, QLoRA's frozen quantized base, clear errors."""
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, records, tiny

from core.errors import ConfigError
from lm import experiment, lora, loop, quant, runs
from lm.config import resolve
from lm.model import build_model

MOE = dict(model__moe__num_experts=4, model__moe__top_k=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A 2-step tiny MoE run (the base of every adapter here)."""
  workdir = str(tmp_path_factory.mktemp("base"))
  loop.run(tiny(train__steps=2, train__eval_batches=1, **MOE), workdir)
  return workdir


def _lora(base, **kw):
  fields = dict(train__steps=2, train__eval_every=2, train__checkpoint_every=2,
                train__eval_batches=1, lora__init_from=base, lora__rank=4,
                optimizer__name="adamw", **MOE)
  fields.update(kw)
  return tiny(**fields)


def _unmerged(x, w, a, b, m, scale):
  """x contracted with W, plus scale * (x contracted with A) contracted with B, by
  explicit einsums over the weight's own axis order (batch axes kept)."""
  letters = iter(string.ascii_lowercase)
  w_idx = [next(letters) for _ in range(w.ndim)]
  batch = [w_idx[i] for i in m.batch]
  contract = [w_idx[i] for i in m.contract]
  out = [c for i, c in enumerate(w_idx) if i not in m.batch and i not in m.contract]
  x_idx, y_idx, r = "".join(batch + contract), "".join(batch + out), next(letters)
  base = jnp.einsum(f"{x_idx},{''.join(w_idx)}->{y_idx}", x, w)
  xa = jnp.einsum(f"{x_idx},{''.join(batch + contract)}{r}->{''.join(batch)}{r}", x, a)
  return base + scale * jnp.einsum(f"{''.join(batch)}{r},{''.join(batch)}{r}{''.join(out)}->"
                                   f"{y_idx}", xa, b)


def _merged(x, w, m):
  letters = iter(string.ascii_lowercase)
  w_idx = [next(letters) for _ in range(w.ndim)]
  batch = [w_idx[i] for i in m.batch]
  contract = [w_idx[i] for i in m.contract]
  out = [c for i, c in enumerate(w_idx) if i not in m.batch and i not in m.contract]
  return jnp.einsum(f"{''.join(batch + contract)},{''.join(w_idx)}->{''.join(batch + out)}",
                    x, w)


def test_merged_weight_equals_unmerged_adapter_forward_and_gradients():
  cfg = resolve(tiny(model__layer_pattern="LS", **MOE))
  built = build_model(cfg.model, 0)
  lcfg = lora.LoraConfig(init_from="x", rank=3, alpha=6.0,
                         targets=("attention", "mlp", "experts", "linear", "head"))
  hook = lora.Lora(lcfg, built, 0)
  shapes, _ = lora.adapter_shapes(built.params, built.axes["params"], lcfg)
  roles = {m.role for m in hook.mats.values()}
  assert roles == {"attention", "experts", "linear", "head"}, roles
  key = jax.random.key(1)
  adapters = jax.tree.map(lambda s: jax.random.normal(jax.random.fold_in(key, s.size),
                                                      s.shape), shapes)
  merged = hook.merge(built.params, adapters)
  for i, (path, m) in enumerate(hook.mats.items()):
    w, ad = quant.get_path(built.params, path), quant.get_path(adapters, path)
    x_shape = tuple(w.shape[j] for j in m.batch + m.contract)
    x = jax.random.normal(jax.random.fold_in(key, 1000 + i), x_shape)
    g = jax.random.normal(jax.random.fold_in(key, 2000 + i),
                          _merged(x, w, m).shape)
    assert_close(_merged(x, quant.get_path(merged, path), m),
                 _unmerged(x, w, ad["a"], ad["b"], m, lcfg.scale), 1e-5)

    def via_merge(a, b, m=m, w=w, x=x, g=g):  # the merge of this one matrix
      return jnp.sum(_merged(x, w + lcfg.scale * lora.delta(w.shape, m, a, b), m) * g)

    def via_adapter(a, b, m=m, w=w, x=x, g=g):
      return jnp.sum(_unmerged(x, w, a, b, m, lcfg.scale) * g)
    for got, want in zip(jax.grad(via_merge, (0, 1))(ad["a"], ad["b"]),
                         jax.grad(via_adapter, (0, 1))(ad["a"], ad["b"])):
      assert_close(got, want, 1e-5)


def test_init_is_the_base_and_only_adapters_train(base):
  exp = experiment.build(_lora(base))
  loaded, _ = runs.load_aux(exp)
  aux = {n: loaded[n] for n in exp.abstract_aux()}
  state = exp.state.init(exp.initial_model(loaded))
  # the base run's own last eval (the same first held-out batch), bitwise
  ev_init = loop.evaluate(exp, state["params"], state["model_state"], 1, aux=aux)
  assert ev_init["eval_loss"] == records(base)[-1]["eval_loss"]
  before = jax.device_get(aux["lora"]["params"])
  n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
  n_adapters = sum(x.size for x in jax.tree.leaves(state["params"]))
  n_base = sum(x.size for x in jax.tree.leaves(before))
  assert n_adapters < n_base / 4 and n_opt <= 2 * n_adapters + 16
  with jax.set_mesh(exp.mesh):
    batch = exp.put_batch(next(exp.data.train_iterator(0)))
    state, _ = exp.train_step(state, batch, aux)
  for path, m in lora.Lora(exp.config.lora, exp.model, 0).mats.items():
    assert float(jnp.abs(quant.get_path(state["params"], path)["b"]).max()) > 0, path
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(aux["lora"]["params"]))


def _two_steps(config, devices=None):
  exp = experiment.build(config, devices=devices)
  loaded, _ = runs.load_aux(exp)
  aux = {n: loaded[n] for n in exp.abstract_aux()}
  state = exp.state.init(exp.initial_model(loaded))
  it = exp.data.train_iterator(0)
  with jax.set_mesh(exp.mesh):
    for _ in range(2):
      state, _ = exp.train_step(state, exp.put_batch(next(it)), aux)
  return jax.device_get(state["params"])


def test_eight_devices_equal_one(base):
  one = _two_steps(_lora(base, model__dtype="float32"), jax.devices()[:1])
  eight = _two_steps(_lora(base, model__dtype="float32", mesh__data=2, mesh__fsdp=2,
                           mesh__expert=2))
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-4), eight, one)
  assert float(np.abs(one["block_0"]["mlp"]["gate"]["b"]).max()) > 0  # experts' adapters


def test_checkpoint_holds_adapters_resume_is_bitwise_and_export_merges(base, tmp_path):
  cfg = lambda: _lora(base, train__steps=4, train__checkpoint_every=4, train__eval_every=4)
  whole = loop.run(cfg(), str(tmp_path / "a"))
  work = str(tmp_path / "b")
  loop.run(cfg(), work, stop_at=2)
  resumed = loop.run(cfg(), work)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(whole["state"]["params"]),
               jax.device_get(resumed["state"]["params"]))
  # the checkpoint: adapters (and model state), far smaller than the base's
  size = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d)
                       for f in fs)
  assert (size(os.path.join(work, "checkpoints", "4"))
          < size(os.path.join(base, "checkpoints", "2")) / 2)
  # read back merged: evaluate on the LoRA run, on its export, and the run's own eval agree
  from experiments import evaluate
  from experiments import export as export_cli
  out = str(tmp_path / "merged")
  r = export_cli.export(work, out)
  assert r["step"] == 4 and r["adapter_bytes"] < r["bytes"]
  assert not os.path.isdir(os.path.join(work, "merged"))
  # the merged run (read back through lm.runs.read_merged) evaluates like the run's own
  # eval, whose step merged the adapters itself
  assert evaluate.evaluate(out, eval_batches=1)["eval_loss"] == records(work)[-1]["eval_loss"]
  with pytest.raises(ConfigError, match="is not a LoRA run"):
    export_cli.export(base, str(tmp_path / "none"))


def test_qlora_base_stays_quantized_and_frozen(base, tmp_path):
  cfg = _lora(base, lora__base_quant="int4", lora__base_group_size=16)
  exp = experiment.build(cfg)
  loaded, _ = runs.load_aux(exp)
  aux = {n: loaded[n] for n in exp.abstract_aux()}
  stored = aux["lora"]["params"]
  q = quant.get_path(stored, ("block_0", "mlp", "gate"))
  assert q["q"].dtype == jnp.int4 and q["scale"].dtype == jnp.float32
  assert stored["embedding"].dtype == jnp.float32  # not a target
  state = exp.state.init(exp.initial_model(loaded))
  # at init the forward is the base quantized as PTQ quantizes it (same numerics)
  ev = loop.evaluate(exp, state["params"], state["model_state"], 1, aux=aux)
  ptq = runs.load(base, {"quant.weight": "int4", "quant.group_size": 16,
                         "quant.targets": ("attention", "mlp", "experts", "linear")})
  ev_ptq = loop.evaluate(ptq.experiment, ptq.params, ptq.model_state, 1)
  assert_close(ev["eval_loss"], ev_ptq["eval_loss"], 1e-6)
  before = jax.device_get(stored)
  with jax.set_mesh(exp.mesh):
    state, _ = exp.train_step(state, exp.put_batch(next(exp.data.train_iterator(0))), aux)
  assert float(jnp.abs(state["params"]["block_0"]["attn"]["q"]["b"]).max()) > 0
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(stored))


def test_nf4_base_round_trips_within_its_grid():
  w = jax.random.normal(jax.random.key(3), (64, 8))
  m = quant.Matrix("mlp", (0,), ())
  cfg = lora.LoraConfig(init_from="x", base_quant="nf4", base_group_size=16)
  s = lora.quantize_base(w, m, cfg)
  back = lora.dequantize_base(s, m, cfg, jnp.float32)
  assert s["q"].shape == w.shape and s["scale"].shape == (4, 8)
  err = jnp.abs(back - w) / jnp.abs(w).max()
  assert float(err.max()) < 0.15 and float(err.mean()) < 0.05


def test_clear_errors(base, tmp_path):
  work = str(tmp_path / "w")
  with pytest.raises(ConfigError, match=r"^lora.init_from='/nonexistent': no such directory"):
    loop.run(_lora("/nonexistent"), work)
  with pytest.raises(ConfigError, match=r"^lora.init_from=.*is another architecture: "):
    loop.run(_lora(base, model__d_model=96), work)
  with pytest.raises(ConfigError, match=r"^lora.rank=0: "):
    resolve(_lora(base, lora__rank=0))
  with pytest.raises(ConfigError, match=r"^lora.targets=\('linear',\): names no weight matrix"):
    experiment.build(_lora(base, lora__targets=("linear",)))
  with pytest.raises(ConfigError, match=r"^prune.method='magnitude': cannot prune LoRA"):
    resolve(_lora(base, prune__method="magnitude"))
  assert not os.path.exists(os.path.join(work, "checkpoints"))
