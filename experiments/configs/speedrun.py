"""Speed-run: AdamW vs. Muon vs. NAMO at a fixed model and token budget.

  --config=experiments/configs/speedrun.py:tiny --config.optimizer.name=adamw|muon|namo|namo_d

``tiny`` is sized for the 2-core CPU ablation (``records/``); ``small`` for one
accelerator. The question (modded-nanogpt's optimisation track, NAMO's paper):
how many steps to a target eval loss, and the final eval loss, for each
optimizer at its best learning rate. Each optimizer group's peak learning rate
lives in its own field (``optimizer.learning_rate`` for AdamW and the AdamW
group of the hybrids, ``optimizer.muon.learning_rate``,
``optimizer.namo.learning_rate``); sweep those.
"""
from experiments.configs import base, unknown_arg

SIZES = {
    # d_model, n_layers, heads, kv_heads, d_ff, seq_len, batch, steps
    "tiny": (96, 3, 4, 2, 256, 128, 16, 240),
    "small": (384, 6, 6, 2, 1024, 512, 32, 3000),
}


def get_config(size: str = "tiny"):
  if size not in SIZES:
    raise unknown_arg("speedrun.py", size, SIZES)
  d, n_layers, heads, kv_heads, d_ff, seq_len, batch, steps = SIZES[size]
  c = base.get_config("tiny" if size == "tiny" else "small")
  c.name = f"speedrun-{size}"
  c.model.update(dict(d_model=d, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads, d_ff=d_ff))
  c.data.seq_len, c.data.batch_size = seq_len, batch
  c.train.steps = steps
  c.train.log_every = 10
  c.train.eval_every = steps // 12
  c.train.eval_batches = 8
  c.train.checkpoint_every = steps
  c.optimizer.schedule = "wsd"  # warmup-stable-decay, as the speed-runs use
  c.optimizer.decay_fraction = 0.3
  c.optimizer.min_lr_ratio = 0.0
  return c
