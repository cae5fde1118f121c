"""Linear attention (Mamba-2 SSD and 2Mamba2Furious) and hybrid stacks.

  --config=experiments/configs/ssd.py:<size>[,<pattern>]
  --config.model.linear.variant=ssd|mamba2s|2mamba

``model.layer_pattern`` picks the token mixer per layer, cycled: ``L`` linear
attention (``attention/linear.py``), ``S`` softmax attention. ``L`` is a pure
linear-attention stack; ``LS`` or ``LLLS`` are hybrids.

Sizes:
- ``tiny``: the base tiny model with every layer linear (tests, seconds on CPU).
- ``mqar``: 4 layers on the synthetic multi-query associative recall task (the
  recall ablation; sweep ``data.seq_len`` and ``model.layer_pattern``).
- ``corpus``: the same model on the embedded corpus.
"""
from experiments.configs import base

SIZES = ("tiny", "mqar", "corpus")


def get_config(arg: str = "tiny"):
  size, _, pattern = arg.partition(",")
  if size not in SIZES:
    raise ValueError(f"ssd.py: unknown size {size!r}; choose one of {SIZES} "
                     "(optionally ',<layer pattern>', e.g. tiny,LS)")
  c = base.get_config("tiny")
  c.name = f"ssd-{size}"
  c.model.layer_pattern = pattern or "L"
  c.model.linear.variant = "ssd"
  c.model.linear.chunk_size = 16 if size == "tiny" else 64
  if size in ("mqar", "corpus"):
    c.model.update(dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=256))
    c.data.seq_len, c.data.batch_size = 256, 32
    c.train.steps = 400
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 20, 100, 400
    c.optimizer.learning_rate = 3e-3
  if size == "mqar":
    c.data.source = "synthetic"
    c.data.synthetic.task = "mqar"
    c.data.synthetic.num_pairs = 16
    c.data.synthetic.num_queries = 16
  return c
