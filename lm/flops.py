"""Model FLOPs of a step, per-device peak throughput, and model FLOP utilisation (MFU).

``forward_flops(model, seq_len)`` counts the multiply-adds (2 FLOPs each) of every
matmul one sequence's forward pass performs, read off the config, not the program:

* softmax layers: the q / k / v / o projections (k and v at ``n_kv_heads``) and the two
  attention matmuls (scores, values) over the keys each query may see: causal, so query
  ``t`` sees ``t + 1`` keys (half the square, plus the diagonal); with a sliding window
  at most ``window``; block-sparse attention times the kept share of the causally valid
  blocks (``density``, measured: the layers sow it); hierarchical attention is counted as
  dense causal attention (an upper bound).
* linear-attention layers (``model.linear``): the four projections, the decay / dt
  projections, the depthwise convolutions, and the chunked algorithm's matmuls at its
  chunk size C over the padded length (per head and token: scores ``2 C H`` and values
  ``2 C V`` inside the chunk, the chunk's state ``2 P V`` and the state's readout ``2 P
  V``; 2Mamba's feature dimension is ``P = H (H + 1) / 2`` and its values carry the
  normaliser column, ``V = H + 1``).
* feed-forward: SwiGLU's three matrices; an MoE layer counts its router, ``top_k``
  routed experts (the active ones, whatever the dispatch computes) and its shared experts.
* the output head (tied or not); the embedding lookup is not a matmul.

A train step is 3 forward passes' worth (the backward computes a gradient for each
operand of every matmul: twice the forward), the convention of MFU (PaLM, appendix B):
recomputation under remat is not model FLOPs. Elementwise work (norms, softmax, RoPE,
activations) is not counted.

``jaxpr_dot_flops`` counts the ``dot_general`` FLOPs of a traced program (the twin the
tests check the count against: a program's own matmuls, scans times their length).
"""
import math
from typing import Any

# Dense bf16 peak TFLOP/s per device (one chip; an accelerator without sparsity), from the
# vendors' data sheets: TPU v4 / v5e / v5p / v6e (Trillium) / 7x (Ironwood); NVIDIA A100 SXM,
# H100 SXM (PCIe 756), H200, B200. Matched in order against ``device.device_kind``.
PEAK_TFLOPS = (
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
    ("TPU7x", 2307.0),
    ("TPU 7x", 2307.0),
    ("A100", 312.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak TFLOP/s of one device of this kind; None when unknown (CPU)."""
  for key, peak in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peak
  return None


def device_peak_tflops(override: float = 0.0, devices=None) -> float | None:
  """``override`` when > 0 (``train.peak_tflops``), else the table's entry for the
  first device (None on CPU or an unknown device)."""
  if override > 0:
    return float(override)
  import jax
  device = (devices or jax.devices())[0]
  if device.platform == "cpu":
    return None
  return peak_tflops(device.device_kind)


def mean_keys(seq_len: int, window: int = 0, causal: bool = True) -> float:
  """Keys a query sees on average: ``(T + 1) / 2`` causal; ``min(t + 1, window)``
  averaged with a window; ``T`` without the causal mask."""
  T = seq_len
  if not causal:
    return float(min(T, window) if window else T)
  if not window or window >= T:
    return (T + 1) / 2
  return (window * (window + 1) / 2 + (T - window) * window) / T


def _softmax_layer(m, T: int, density: float | None, causal: bool) -> dict:
  D, N, K, H = m.d_model, m.n_heads, m.n_kv_heads, m.head_size
  proj = 2 * T * D * H * (2 * N + 2 * K)
  keys = mean_keys(T, m.sliding_window, causal)
  attention = 2 * 2 * T * N * H * keys
  if m.sparse is not None and density is not None:
    attention *= density
  return {"projections": proj, "attention": attention}


def _linear_layer(m, T: int) -> dict:
  from attention.linear import _LAYER  # the per-variant layer table (width, dt, decay)
  D, N, H = m.d_model, m.n_heads, m.head_size
  layer = _LAYER[m.linear.variant]
  proj = 2 * T * D * N * H * 4
  proj += 2 * T * D * N * (int(layer["dt"]) + int(layer["decay"] == "proj"))
  conv = 2 * T * layer["width"] * N * H * 3
  C = m.linear.chunk_size
  padded = math.ceil(T / C) * C
  two = m.linear.variant == "2mamba"
  P, V = (H * (H + 1) // 2, H + 1) if two else (H, H)
  core = padded * N * (2 * C * H + 2 * C * V + 4 * P * V)
  return {"projections": proj + conv, "attention": core}


def _ffn(m, T: int, layer: int) -> float:
  D = m.d_model
  moe = m.moe
  if not moe.is_moe_layer(layer):
    return 2 * T * D * m.d_ff * 3
  F = moe.d_ff or m.d_ff
  router = 2 * T * D * moe.num_experts
  return router + 2 * T * D * F * 3 * (moe.top_k + moe.num_shared)


def forward_flops(model_cfg, seq_len: int, *, density: float | None = None,
                  causal: bool = True) -> dict[str, float]:
  """Matmul FLOPs of one sequence's forward pass, by part: ``projections`` (attention and
  linear-attention projections, convolutions), ``attention`` (the mixing itself),
  ``ffn``, ``head``, and ``total``.

  Args:
    model_cfg: ``lm.config.ModelConfig``.
    seq_len: tokens in the sequence.
    density: block-sparse layers' kept share of causally valid blocks (None: dense).
    causal: False counts every key for every query (what a dense ``xla`` attention
      computes: the twin the tests compare with a program's own matmuls).
  """
  m, T = model_cfg, seq_len
  parts = {"projections": 0.0, "attention": 0.0, "ffn": 0.0,
           "head": 2.0 * T * m.d_model * m.vocab_size}
  for layer in range(m.n_layers):
    mixer = (_softmax_layer(m, T, density, causal) if m.mixer(layer) == "S"
             else _linear_layer(m, T))
    for key, value in mixer.items():
      parts[key] += value
    parts["ffn"] += _ffn(m, T, layer)
  parts["total"] = sum(parts.values())
  return parts


def train_flops(model_cfg, batch: int, seq_len: int, *, density: float | None = None) -> float:
  """Model FLOPs of one train step on ``batch`` sequences: 3 forward passes."""
  return 3.0 * batch * forward_flops(model_cfg, seq_len, density=density)["total"]


def utilisation(step_flops: float, seconds: float, n_devices: int,
                peak: float | None) -> dict[str, float]:
  """``model_tflops_per_sec`` (per device) and ``mfu`` (its share of ``peak``, when known)
  for ``step_flops`` done in ``seconds`` by ``n_devices``."""
  per_device = step_flops / max(seconds, 1e-12) / n_devices / 1e12
  out = {"model_tflops_per_sec": per_device}
  if peak:
    out["mfu"] = per_device / peak
  return out


# ----------------------------------------------------------------------------- the twin


def jaxpr_dot_flops(jaxpr: Any) -> float:
  """FLOPs of every ``dot_general`` (and ``ragged_dot``) in a (closed) jaxpr, nested
  programs included; a scan's body counts ``length`` times. While loops count once (their
  trip count is not in the program) and a ``cond`` counts every branch."""
  import numpy as np
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * float(np.prod(out)) * float(np.prod([lhs[d] for d in lhs_contract]))
    elif name.startswith("ragged_dot"):
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      total += 2.0 * lhs[0] * lhs[1] * rhs[-1]  # each row meets one group's matrix
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in _subjaxprs(eqn.params):
      total += times * jaxpr_dot_flops(sub)
  return total


def _subjaxprs(params: dict):
  from jax.extend import core as jax_core
  for value in params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
        yield v
