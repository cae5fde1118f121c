"""One NVIDIA GPU (H100 / H200): the settings that make a train step fast there.

  --config=experiments/configs/gpu.py:<size>    size: 125m | moe | small

- ``125m``: ``base.py:125m`` (GPT-2-small width and depth) with cuDNN's fused attention
  (``jax.nn.dot_product_attention``, ``attention_impl=jax_nn``), bf16 compute, fp32
  master weights, and ``base.py:125m``'s batch of 64 x 1024 tokens (the recorded H100
  step used 32; whether 64 fills the chip better is for ``benchmarks/gpu_check.sh`` to
  measure: not yet run on a GPU).
- ``moe``: the same model with 8 experts, top-2, of width d_ff / 2 in every layer: the
  active matmul FLOPs per token equal ``125m``'s (the router aside); dropless dispatch
  with the platform's grouped matmul.
- ``small``: ``base.py:small`` with the same settings (a quick check).

XLA flags (``train.xla_flags``, applied before JAX starts): the latency-hiding
scheduler, cuBLAS for every matmul instead of Triton's GEMM emitter (NVIDIA's JAX
guidance and MaxText's GPU configs). Command buffers stay at XLA's default;
``benchmarks/gpu_check.sh`` measures them off as well. ``model.param_dtype=bfloat16``
(bf16 master weights) is measured there too but not the default: it changes training
numerics. MFU is logged against the device's peak (``lm.flops``).
"""
from experiments.configs import base, unknown_arg

XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true "
             "--xla_gpu_enable_triton_gemm=false")
SIZES = ("125m", "moe", "small")


def get_config(size: str = "125m"):
  if size not in SIZES:
    raise unknown_arg("gpu.py", size, SIZES)
  c = base.get_config("small" if size == "small" else "125m")
  c.name = f"gpu-{size}"
  c.model.attention_impl = "jax_nn"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.train.xla_flags = XLA_FLAGS
  c.train.progress = "log"
  if size == "moe":
    c.model.moe.num_experts = 8
    c.model.moe.top_k = 2
    c.model.moe.d_ff = c.model.d_ff // 2
    c.model.moe.dispatch = "dropless"
  return c
