"""Long-context softmax attention with context parallelism over ``mesh.sequence``.

  --config=experiments/configs/long_context.py:<size>
  --config.model.context_parallel=ulysses|headwise|ring|zigzag   (attention/context.py)

The sequence is sharded over the ``sequence`` mesh axis (the residual stream's
``length`` axis), and each attention layer exchanges what it needs: Ulysses
all-to-alls sequence shards into head shards; headwise does the same a few heads
per stage (Untied Ulysses), so only one stage's heads are ever gathered; ring passes
key/value blocks around the ring with an online softmax; zigzag runs the same ring with
each device holding an early and a late chunk, so causal work is the same on every
device (seq_len a multiple of 2 x mesh.sequence).

Sizes:
- ``tiny``: 2 layers, 4096 tokens, every device on the sequence axis (8 simulated
  CPU devices in the tests; ring).
- ``v5p``: a 4-layer Llama-7B-width model (32 heads of 128) at 32k tokens per
  sequence on a v5p-64 slice (``experiments.compile --topology=v5p:4x4x2``),
  data x sequence = 2 x 16; headwise runs 2 stages of 16 heads.
"""
from experiments.configs import base, unknown_arg

SIZES = ("tiny", "v5p")


def get_config(size: str = "tiny"):
  if size not in SIZES:
    raise unknown_arg("long_context.py", size, SIZES)
  c = base.get_config("tiny" if size == "tiny" else "small")
  c.name = f"long-context-{size}"
  c.model.context_parallel = "ring"
  c.mesh.data, c.mesh.sequence = 1, -1
  if size == "tiny":
    c.model.update(dict(d_model=64, n_layers=2, n_heads=8, n_kv_heads=8))
    c.data.seq_len, c.data.batch_size = 4096, 1
    c.train.steps = 20
  else:
    c.model.update(dict(d_model=4096, n_layers=4, n_heads=32, n_kv_heads=8, d_ff=11008,
                        head_dim=128, remat="full"))
    c.data.seq_len, c.data.batch_size = 32768, 2
    c.mesh.data, c.mesh.sequence = 2, -1
  return c
