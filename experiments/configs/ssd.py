"""Linear attention (Mamba-2 SSD and 2Mamba2Furious) and hybrid stacks.

  --config=experiments/configs/ssd.py:<size>[,<pattern>]
  --config.model.linear.variant=ssd|mamba2s|2mamba

``model.layer_pattern`` picks the token mixer per layer, cycled: ``L`` linear
attention (``attention/linear.py``), ``S`` softmax attention. ``L`` is a pure
linear-attention stack; ``LS`` or ``LLLS`` are hybrids.

Sizes:
- ``tiny``: the base tiny model with every layer linear (tests, seconds on CPU).
- ``mqar``: 2 layers of width 64 on synthetic multi-query associative recall
  (the recall ablation; sweep ``model.layer_pattern`` and the length together
  with ``data.synthetic.num_pairs`` / ``num_queries``).
- ``recall64`` / ``recall128`` / ``recall256``: the recall record
  (records/2026-11-29-mqar-recall): the same model at a constant learning rate (sweep
  ``optimizer.learning_rate``), 8 pairs in 64 tokens; 8 pairs with the queries spread
  over 128 tokens, or 16 pairs spread over 256 (Zoology's layout, for the
  length-generalisation test: evaluate at a longer ``data.seq_len``); sweep
  ``model.layer_pattern``, ``model.linear.variant`` and ``model.qkv_conv`` (softmax with
  the linear layers' short conv).
- ``corpus``: the same model on the embedded corpus.
- ``table``: 2Mamba2Furious' main comparison at CPU scale: the same 2 layers of width 64
  on the embedded corpus with the shipped BPE (bits per byte); sweep
  ``model.layer_pattern`` (S: softmax), ``model.linear.variant`` and
  ``model.linear.decay_bias`` (records/2026-11-29-2mamba-table).
"""
from experiments.configs import base, unknown_arg

SIZES = ("tiny", "mqar", "recall64", "recall128", "recall256", "corpus", "table")


def get_config(arg: str = "tiny"):
  size, _, pattern = arg.partition(",")
  if size not in SIZES:
    raise unknown_arg("ssd.py", size, SIZES)
  c = base.get_config("tiny")
  c.name = f"ssd-{size}"
  c.model.layer_pattern = pattern or "L"
  c.model.linear.variant = "ssd"
  c.model.linear.chunk_size = 16 if size == "tiny" else 64
  if size != "tiny":
    c.model.update(dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=192))
    c.train.log_every, c.train.checkpoint_every = 20, 10_000
  if size in ("mqar", "recall64", "recall128", "recall256"):
    # 8 key-value pairs then 8 queries in 64 tokens; scale seq_len with num_pairs
    # and num_queries (2 * (pairs + queries) <= seq_len + 1) to lengthen the task.
    c.data.source = "synthetic"
    c.data.synthetic.task = "mqar"
    c.data.synthetic.num_pairs = c.data.synthetic.num_queries = 8
    c.data.synthetic.vocab = 128
    c.data.seq_len, c.data.batch_size = 64, 32
    c.train.steps, c.train.eval_every = 600, 100
    c.optimizer.learning_rate = 1e-2
  if size.startswith("recall"):
    c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 50
    c.train.steps, c.train.eval_every, c.train.eval_batches = 1000, 100, 4
    c.train.checkpoint_every = c.train.steps
  if size in ("recall128", "recall256"):  # queries spread: 2048 tokens a step, as recall64
    c.data.synthetic.spread = True
    c.data.seq_len = int(size[len("recall"):])
    c.data.batch_size = 2048 // c.data.seq_len
  if size == "recall256":
    c.data.synthetic.num_pairs = c.data.synthetic.num_queries = 16
  if size == "corpus":
    c.data.seq_len, c.data.batch_size = 256, 16
    c.train.steps, c.train.eval_every = 300, 50
    c.optimizer.learning_rate = 3e-3
  if size == "table":
    c.model.linear.variant = "2mamba"
    c.data.tokenizer = "bpe"
    c.data.seq_len, c.data.batch_size = 128, 16
    c.train.steps, c.train.eval_every, c.train.eval_batches = 300, 100, 8
    c.optimizer.learning_rate = 3e-3
  return c
