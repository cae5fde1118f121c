"""Quantized weights: their memory, a quantized matmul's speed and a decode step's speed
vs bf16, measured side by side in one process.

  python benchmarks/quant.py [--out=benchmarks/results/quant.md]

1. Weight bytes of the ``125m`` config (d_model 768, 12 layers, vocab 50304 padded:
   exact, from its shapes) as fp32, bf16, int8 per channel, int4 g128 packed two per
   byte (our checkpoint) and int4 as qwix holds it in memory (one byte per value, qwix
   issue 328), scales included; embeddings stay in their dtype.
2. One matmul x [M, 1024] @ W [1024, 4096]: bf16 (``jnp.dot``), weight-only int8
   (qwix ``dot_general`` on an int8 ``QArray`` weight, per output channel) and w8a8
   (both operands int8 QArrays: an int8 x int8 -> int32 dot), at M = 1 (decode) and
   M = 256 (prefill / training rows).
3. One decode step (batch 1, context 512) of a d_model 512, 8-layer model: weights
   bf16 vs int8 per channel held as int8 + scales and dequantized inside the jitted step
   (what weight-only int8 serving does without a fused kernel); and the KV cache bf16
   vs int8.

Random weights (speed does not depend on them). On CPU, XLA has no int4 matmul and
emulates bf16; the ratios are what this host does, not what a TPU or GPU does.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402


def memory_rows() -> list[dict]:
  import jax
  from experiments.configs import load, override
  from lm import config as config_lib
  from lm import quant
  from lm.model import build_model
  c = override(load("experiments/configs/base.py:125m"), {"model.vocab_size": 50304})
  cfg = config_lib.resolve(c).model
  built = build_model(cfg, 0, abstract=True)
  axes, params = built.axes["params"], built.params
  bf16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, "bfloat16"), params)
  rows = [("fp32", quant.weight_bytes(params, axes)), ("bf16", quant.weight_bytes(bf16, axes))]
  for name, q, packed in (("int8 per channel", quant.QuantConfig(weight="int8"), True),
                          ("int4 g128, packed (our checkpoint)",
                           quant.QuantConfig(weight="int4", group_size=128), True),
                          ("int4 g128, one byte per value (qwix in memory)",
                           quant.QuantConfig(weight="int4", group_size=128), False)):
    rows.append((name, quant.weight_bytes(bf16, axes, q, packed=packed)))
  return [{"weights": n, "bytes": b} for n, b in rows]


def matmul_rows() -> list[dict]:
  import jax
  import jax.numpy as jnp
  import qwix
  K, N = 1024, 4096
  w = jax.random.normal(jax.random.key(0), (K, N), jnp.float32) * K ** -0.5
  wq = qwix.quantize(w, jnp.int8, channelwise_axes=(1,))
  rows = []
  for M in (1, 256):
    x = jax.random.normal(jax.random.key(1), (M, K), jnp.float32)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    fns = {
        "bf16": (jax.jit(lambda a, b: jnp.dot(a, b)), (xb, wb)),
        "int8 weight-only": (jax.jit(lambda a, b: qwix.dot_general(a, b, dims)), (xb, wq)),
        "w8a8": (jax.jit(lambda a, b: qwix.dot_general(
            qwix.quantize(a, jnp.int8, channelwise_axes=(0,)), b, dims)), (x, wq)),
    }
    base = None
    for name, (fn, args) in fns.items():
      t = common.median_time(fn, *args, steps=50, warmup=3)
      base = base or t
      rows.append({"M": M, "kind": name, "us": t * 1e6, "ratio": t / base})
      print(rows[-1], flush=True)
  return rows


def decode_rows(context: int = 512, steps: int = 32) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from experiments.configs import load, override
  from lm import config as config_lib
  from lm import decode, quant
  from lm.model import build_model
  from core import quant as cq
  fields = {"model.d_model": 512, "model.n_layers": 8, "model.n_heads": 8,
            "model.n_kv_heads": 2, "model.d_ff": 1536, "model.vocab_size": 4096,
            "model.dtype": "bfloat16", "model.param_dtype": "bfloat16"}
  cfg = config_lib.resolve(override(load("experiments/configs/base.py:tiny"), fields)).model
  built = build_model(cfg, 0)
  model = decode.Model.from_weights(cfg, built.params, built.state)
  axes = built.axes["params"]
  mats = quant.matrices(axes)

  def store(params):  # targeted matrices -> (int8 values, scales) of the merged shape
    out = params
    for path, m in mats.items():
      w = quant.get_path(params, path)
      shape, c = quant.merged_shape(w.shape, m)
      out = quant.set_path(out, path, cq.quantize(w.reshape(shape), "int8", c))
    return out

  def load_back(stored):
    out = stored
    for path, m in mats.items():
      qa = quant.get_path(stored, path)
      shape = quant.get_path(built.params, path).shape
      import qwix
      out = quant.set_path(out, path, qwix.dequantize(qa).reshape(shape).astype(jnp.bfloat16))
    return out

  stored = jax.jit(store)(built.params)
  tok = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (1, 1)), jnp.int32)
  rows = []
  for cache_dtype in ("bfloat16", "int8"):
    dec = decode.Decoder(model, max_len=context + steps, cache_dtype=cache_dtype)
    prompt = np.random.default_rng(1).integers(0, 4096, (1, context))
    _, cache = dec.prefill(prompt, np.array([context]))
    one = jnp.ones((1,), jnp.int32)
    plain = jax.jit(lambda p, c: decode.extend(model, p, c, tok, one)[0])
    dequant = jax.jit(lambda s, c: decode.extend(model, load_back(s), c, tok, one)[0])
    for weights, fn, p in (("bf16", plain, built.params), ("int8 (dequantized in the step)",
                                                          dequant, stored)):
      t = common.median_time(fn, p, cache, steps=steps, warmup=2)
      rows.append({"weights": weights, "kv": cache_dtype, "ms": t * 1e3,
                   "weight_bytes": sum(x.nbytes for x in jax.tree.leaves(p)),
                   "kv_bytes": decode.cache_bytes(cache)})
      print(rows[-1], flush=True)
  base = rows[0]["ms"]
  for r in rows:
    r["ratio"] = r["ms"] / base
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results", "quant.md"))
  args = ap.parse_args()
  os.chdir(common.REPO)
  mem, mm, dec = memory_rows(), matmul_rows(), decode_rows()
  mb = lambda n: f"{n / 2**20:,.1f} MiB"
  lines = ["## Quantized weights: memory, matmul and decode-step speed vs bf16", ""]
  lines += common.environment_lines()
  lines += ["- what each row is: `benchmarks/quant.py`'s docstring; ratios are times over "
            "the bf16 row of the same shape, measured in this one run", "",
            "### Weight bytes, 125m config (vocab 50304)", "",
            "| weights | bytes | vs fp32 |", "| --- | ---: | ---: |"]
  for r in mem:
    lines.append(f"| {r['weights']} | {mb(r['bytes'])} | {r['bytes'] / mem[0]['bytes']:.3f} |")
  lines += ["", "### One matmul x [M, 1024] @ W [1024, 4096]", "",
            "| M | kind | time (us) | vs bf16 |", "| ---: | --- | ---: | ---: |"]
  for r in mm:
    lines.append(f"| {r['M']} | {r['kind']} | {r['us']:.0f} | {r['ratio']:.2f} |")
  lines += ["", "### One decode step, batch 1, context 512 (d_model 512, 8 layers, 8/2 heads)",
            "", "| weights | KV cache | ms | vs bf16/bf16 | weight bytes | KV bytes |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
  for r in dec:
    lines.append(f"| {r['weights']} | {r['kv']} | {r['ms']:.2f} | {r['ratio']:.2f} | "
                 f"{mb(r['weight_bytes'])} | {mb(r['kv_bytes'])} |")
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
