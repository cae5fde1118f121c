"""Decode speed with the KV / state cache vs re-running the full forward, per token
mixer and context, and cache bytes vs context length.

  python benchmarks/decode.py [--contexts=256,1024,4096] [--mixers=softmax,ssd,...]
      [--out=benchmarks/results/decode.md]

Per (mixer, context C): ``cached`` is the time of one decode step with C tokens in
the cache (the jitted loop making 64 decode steps after a prefill of C - 65 tokens,
the prefill not timed, over 64); ``recompute`` is one full forward over C tokens,
what a cacheless loop pays for every new token at that context. Weights are random
(speed does not depend on them); batch 1, fp32 on CPU (bf16 matmuls are emulated
there), bf16 on accelerators. Cache bytes are exact (the cache's shapes), for the
model below and for a 12-head, head_dim 64 layer like the papers'.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

MIXERS = {
    "softmax": {},
    "sliding_window": {"sliding_window": 256},
    "hierarchical": {"hierarchical.block": 64, "hierarchical.local_blocks": 1},
    "block_sparse": {"sparse.enabled": True, "sparse.block_k": 64, "sparse.block_q": 64,
                     "sparse.top_k": 0.0, "sparse.top_p": 0.5},
    "ssd": {"layer_pattern": "L", "linear.variant": "ssd"},
    "mamba2s": {"layer_pattern": "L", "linear.variant": "mamba2s"},
    "2mamba": {"layer_pattern": "L", "linear.variant": "2mamba"},
    "hybrid LLLS": {"layer_pattern": "LLLS", "linear.variant": "2mamba"},
    "moe 8x top-2": {"moe.num_experts": 8, "moe.top_k": 2, "moe.d_ff": 256},
}


def model_cfg(overrides: dict, dtype: str):
  from experiments.configs import load, override
  from lm import config as config_lib
  fields = {"model.d_model": 256, "model.n_layers": 4, "model.n_heads": 8,
            "model.n_kv_heads": 2, "model.head_dim": 32, "model.d_ff": 768,
            "model.dtype": dtype, "model.vocab_size": 4096}
  fields.update({f"model.{k}": v for k, v in overrides.items()})
  return config_lib.resolve(override(load("experiments/configs/base.py:tiny"), fields)).model


def time_mixer(name: str, contexts, dtype: str, steps: int = 64) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lm import decode
  from lm.model import apply, build_model
  cfg = model_cfg(MIXERS[name], dtype)
  built = build_model(cfg, 0)
  model = decode.Model.from_weights(cfg, built.params, built.state)
  forward = jax.jit(lambda p, t: apply(built.graphdef, p, built.state, t)[0])
  rows = []
  for C in contexts:
    dec = decode.Decoder(model, max_len=C, cache_dtype="bfloat16" if dtype == "bfloat16"
                         else "float32")
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, C - steps - 1).tolist()
    req = decode.Request([prompt], steps + 1)
    times = []
    for _ in range(4):  # the first compiles; each run gets a fresh prefill, not timed
      carry, _ = dec.start(req)
      jax.block_until_ready(carry)
      times.append(_timed(lambda: jax.block_until_ready(dec.run(req, carry, steps + 1))))
    cached = min(times[1:]) / steps
    full = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, C)))
    recompute = common.median_time(forward, built.params, full, steps=3)
    rows.append({"mixer": name, "context": C, "cached_ms": cached * 1e3,
                 "recompute_ms": recompute * 1e3, "speedup": recompute / cached,
                 "cache_bytes": decode.cache_bytes(dec.new_cache(1))})
    print(rows[-1], flush=True)
  return rows


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def cache_bytes_table(contexts) -> list[str]:
  """Bytes of one layer's cache for one sequence vs context: bf16 KV (GQA 12/12 and
  12/4 heads, a 4096 window) and each linear variant's fp32 state + conv inputs."""
  import jax
  from attention.layer import Attention
  from attention.linear import LinearAttention, LinearConfig
  from attention.spec import AttentionSpec
  import jax.numpy as jnp
  from flax import nnx

  def layer_bytes(make, C):
    layer = nnx.eval_shape(make)
    shapes = jax.eval_shape(lambda: layer.init_cache(1, layer.cache_slots(C, 0), jnp.bfloat16))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

  D, N, H = 768, 12, 64
  kinds = {
      "softmax 12 kv heads": lambda: Attention(D, N, N, H, rngs=nnx.Rngs(0)),
      "softmax 4 kv heads": lambda: Attention(D, N, 4, H, rngs=nnx.Rngs(0)),
      "sliding window 4096": lambda: Attention(D, N, 4, H, rngs=nnx.Rngs(0),
                                               spec=AttentionSpec(sliding_window=4096)),
  }
  for v in ("ssd", "mamba2s", "2mamba"):
    kinds[v] = (lambda v=v: LinearAttention(D, N, H, LinearConfig(variant=v), rngs=nnx.Rngs(0)))
  lines = ["| layer (d 768, 12 heads, head_dim 64) | " + " | ".join(f"{c:,}" for c in contexts)
           + " | KV-cache crossover |", "| --- |" + " ---: |" * (len(contexts) + 1)]
  kv12 = {c: layer_bytes(kinds["softmax 12 kv heads"], c) for c in contexts}
  per_token_kv = kv12[contexts[-1]] / contexts[-1]
  for name, make in kinds.items():
    sizes = [layer_bytes(make, c) for c in contexts]
    cross = ""
    if name in ("ssd", "mamba2s", "2mamba"):
      cross = (f"state = bf16 KV (12 kv heads) of {sizes[0] / per_token_kv:,.0f} tokens; "
               f"fp32 KV of {sizes[0] / (2 * per_token_kv):,.0f}")
    lines.append(f"| {name} | " + " | ".join(_mb(s) for s in sizes) + f" | {cross} |")
  return lines


def _mb(n: int) -> str:
  return f"{n / 2**20:,.2f} MiB"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--contexts", default="256,1024,4096")
  ap.add_argument("--mixers", default=",".join(MIXERS))
  ap.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results", "decode.md"))
  args = ap.parse_args()
  os.chdir(common.REPO)
  import jax
  contexts = [int(c) for c in args.contexts.split(",")]
  dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
  rows = []
  for name in args.mixers.split(","):
    rows += time_mixer(name, contexts, dtype)
  lines = ["## Decode: cached step vs full recompute, per token mixer", ""]
  lines += common.environment_lines()
  lines += [f"- model: d_model 256, 4 layers, 8 query / 2 kv heads of 32, d_ff 768, vocab "
            f"4096, {dtype}, batch 1, random weights; cached = one decode step with the "
            "context in the cache (64 steps of the jitted loop, the prefill not timed); "
            "recompute = one full forward over the context", "",
            "| mixer | context | cached ms/token | recompute ms/token | speed-up | cache |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['mixer']} | {r['context']:,} | {r['cached_ms']:.2f} | "
                 f"{r['recompute_ms']:.1f} | {r['speedup']:.1f}x | {_mb(r['cache_bytes'])} |")
  lines += ["", "### Cache bytes per layer and sequence vs context", ""]
  lines += cache_bytes_table([256, 1024, 4096, 16384, 65536])
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
