"""Model FLOPs (lm/flops.py) against hand counts and against the program's own matmuls;
peaks and MFU (a run's MFU and profile: tests/test_train.py)."""
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import tiny
from core.errors import ConfigError
from lm import experiment, flops, loop
from lm.model import apply


def _model(**overrides):
  return experiment.build(tiny(**overrides), devices=jax.devices()[:1])


def test_hand_count_dense_gqa():
  exp = _model(model__d_model=64, model__n_heads=4, model__n_kv_heads=2, model__d_ff=96,
               model__n_layers=3, data__seq_len=32)
  m, T = exp.config.model, 32
  V = m.vocab_size
  per_layer = (2 * T * 64 * 64 * 2  # q and o: 4 heads x 16
               + 2 * T * 64 * 32 * 2  # k and v: 2 kv heads x 16
               + 2 * 2 * T * 4 * 16 * (T + 1) / 2  # scores and values, causal
               + 2 * T * 64 * 96 * 3)  # SwiGLU
  want = 3 * per_layer + 2 * T * 64 * V
  assert flops.forward_flops(m, T)["total"] == pytest.approx(want, rel=1e-12)
  assert flops.train_flops(m, 5, T) == pytest.approx(15 * want, rel=1e-12)


def test_hand_count_window_sparse_moe_linear():
  T = 32
  # Sliding window 8: queries 0..7 see t + 1 keys, the other 24 see 8.
  assert flops.mean_keys(T, 8) == pytest.approx((36 + 24 * 8) / 32)
  assert flops.mean_keys(T, 0, causal=False) == T
  dense = _model(data__seq_len=T).config.model
  window = _model(data__seq_len=T, model__sliding_window=8).config.model
  H, N = dense.head_size, dense.n_heads
  drop = 2 * 2 * T * N * H * ((T + 1) / 2 - flops.mean_keys(T, 8)) * dense.n_layers
  assert (flops.forward_flops(dense, T)["attention"] - flops.forward_flops(window, T)["attention"]
          == pytest.approx(drop))
  # Block-sparse: the attention part scales with the measured density, nothing else does.
  sparse = _model(data__seq_len=T, model__sparse__enabled=True, model__sparse__block_q=16,
                  model__sparse__block_k=16).config.model
  full, quarter = (flops.forward_flops(sparse, T, density=d) for d in (None, 0.25))
  assert quarter["attention"] == pytest.approx(full["attention"] / 4)
  assert quarter["ffn"] == full["ffn"] and quarter["projections"] == full["projections"]
  # MoE in every second layer: router + top-2 of 4 experts of width 48 + one shared expert.
  moe = _model(data__seq_len=T, model__n_layers=2, model__moe__num_experts=4,
               model__moe__top_k=2, model__moe__d_ff=48, model__moe__num_shared=1,
               model__moe__every=2).config.model
  D, F = moe.d_model, moe.d_ff
  assert flops.forward_flops(moe, T)["ffn"] == pytest.approx(
      2 * T * D * F * 3 + 2 * T * D * 4 + 2 * T * D * 48 * 3 * 3)
  # Mamba-2 (ssd): 4 projections, dt (A_log: no decay projection), width-4 convolutions,
  # and the chunked algorithm at chunk 16 over the length padded to 48.
  ssd = _model(data__seq_len=40, model__layer_pattern="L", model__n_layers=1,
               model__linear__variant="ssd", model__linear__chunk_size=16).config.model
  D, N, H = ssd.d_model, ssd.n_heads, ssd.head_size
  parts = flops.forward_flops(ssd, 40)
  assert parts["projections"] == pytest.approx(
      2 * 40 * D * N * H * 4 + 2 * 40 * D * N + 2 * 40 * 4 * N * H * 3)
  assert parts["attention"] == pytest.approx(48 * N * (2 * 16 * H * 2 + 4 * H * H))


def _program_dots(exp, fn=None) -> float:
  c = exp.config
  tokens = jnp.zeros((c.data.batch_size, c.data.seq_len), jnp.int32)
  with jax.set_mesh(exp.mesh):
    if fn is None:
      fn = lambda p, s, t: apply(exp.model.graphdef, p, s, t)[0]
      return flops.jaxpr_dot_flops(jax.make_jaxpr(fn)(exp.model.params, exp.model.state,
                                                      tokens))
    return flops.jaxpr_dot_flops(jax.make_jaxpr(fn)(
        exp.state.abstract, exp.abstract_batch(), exp.abstract_aux()))


@pytest.mark.parametrize("overrides", [
    {},
    {"model__layer_pattern": "LS", "model__linear__variant": "2mamba"},
    {"model__moe__num_experts": 4, "model__moe__top_k": 2},
])
def test_count_equals_the_programs_matmuls(overrides):
  """The twin: the forward's own dot_general / ragged_dot FLOPs (dense ``xla`` attention
  computes every key, so the count is taken without the causal half)."""
  exp = _model(**overrides)
  m, B, T = exp.config.model, exp.config.data.batch_size, exp.config.data.seq_len
  want = B * flops.forward_flops(m, T, causal=False)["total"]
  if m.layer_pattern == "LS":  # the depthwise convolutions run as shifted products, not dots
    layer = 2 * T * 2 * m.n_heads * m.head_size * 3  # width 2, q / k / v
    want -= B * layer * sum(m.mixer(i) == "L" for i in range(m.n_layers))
  if m.moe.enabled:  # the program adds the top-k outputs with one small dot per MoE layer
    want += B * 2 * T * m.moe.top_k * m.d_model * m.n_layers
  assert _program_dots(exp) == pytest.approx(want, rel=1e-9)


def test_train_step_is_three_forwards():
  exp = _model(optimizer__name="adamw")
  c = exp.config
  want = 3 * c.data.batch_size * flops.forward_flops(c.model, c.data.seq_len, causal=False)[
      "total"]
  assert _program_dots(exp, exp.train_step) == pytest.approx(want, rel=1e-9)


def test_peaks():
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert flops.peak_tflops("NVIDIA H200") == 989.0
  assert flops.peak_tflops("TPU v5 lite") == 197.0
  assert flops.peak_tflops("TPU v5p") == 459.0
  assert flops.peak_tflops("cpu") is None
  assert flops.device_peak_tflops(0.0) is None  # the tests run on CPU
  assert flops.device_peak_tflops(2.5) == 2.5
  u = flops.utilisation(6e12, 2.0, 3, None)
  assert u == {"model_tflops_per_sec": 1.0}
  assert flops.utilisation(6e12, 2.0, 3, 4.0)["mfu"] == 0.25


@pytest.mark.parametrize("value", [(3, 2), (0, 1), (1,), (1, 2, 3)])
def test_profile_steps_errors(value):
  with pytest.raises(ConfigError, match="profile_steps"):
    experiment.build(tiny(train__profile_steps=value))


def test_gpu_configs_resolve_and_the_moe_matches_the_dense_active_flops():
  from experiments.configs import gpu, load
  from lm import config as config_lib
  dense, moe = (config_lib.resolve(load(f"experiments/configs/gpu.py:{s}")) for s in
                ("125m", "moe"))
  assert dense.model.attention_impl == "jax_nn" and dense.train.xla_flags == gpu.XLA_FLAGS
  d, m = (flops.forward_flops(c.model, 1024) for c in (dense, moe))
  router = 2 * 1024 * moe.model.d_model * 8 * moe.model.n_layers
  assert m["ffn"] == pytest.approx(d["ffn"] + router)  # equal active FLOPs but the router
  assert m["attention"] == d["attention"] and m["projections"] == d["projections"]


def test_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])  # restored after the test
  with pytest.raises(ConfigError, match=r"^train\.xla_flags='xla_gpu_x=1'.*Fix: "):
    experiment.build(tiny(train__xla_flags="xla_gpu_x=1"))
  # Once JAX runs, a new flag cannot apply any more, and says so.
  jax.devices()
  note = loop.apply_xla_flags("--xla_gpu_enable_triton_gemm=false")
  assert "not applied" in note and "--xla_gpu_enable_triton_gemm=false" in note
  present = os.environ["XLA_FLAGS"].split()[0]
  assert loop.apply_xla_flags(present) is None
