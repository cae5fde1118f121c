"""Trainable block-sparse attention (SpargeAttention2) with distillation fine-tuning.

  --config=experiments/configs/sparse_attention.py:<arg>

Args:
- ``tiny``: block-sparse attention from the start (seq 128, blocks of 16; seconds
  on a CPU); add ``--config.distill.teacher=<dense workdir>`` to distil instead.
- ``teacher``: the dense model of the ablation (seq 512, byte tokens of the
  embedded corpus).
- ``ablation``: the same model with ``model.sparse.enabled`` (blocks of 16, so a
  row has up to 32 key blocks) distilled from ``teacher``'s run (default:
  ``TEACHER``, relative to the repository root; override with
  ``--config.distill.teacher=...``). ``DENSITIES`` holds the mask settings of the
  record, calibrated on the teacher's masks.
- ``teacher_long``: ``teacher``'s weights trained on at seq 2048 (plain
  cross-entropy, ``distill.loss=ce`` from ``HYBRID_RUNS/teacher``, which is
  ``teacher`` itself), so a row has up to 128 key blocks of 16.
- ``ablation_long``: ``teacher_long`` distilled under a mask of ``HYBRID`` (the
  hybrid-rule record, ``experiments/sparse_hybrid.py``).

Reproduce ``records/2026-11-29-sparge-hybrid-mask/`` (its README.md lists the exact
commands; the first trains both teachers, calibrates and measures the masks):

  python -m experiments.sparse_hybrid --out=records/2026-11-29-sparge-hybrid-mask \\
      --eval_densities=0.1 --steps=20

or one of its fine-tunes by hand, e.g. top-p alone:

  python -m experiments.train --config=experiments/configs/sparse_attention.py:ablation_long \\
      --workdir=runs/hybrid-top-p --config.model.sparse.top_k=0.0 \\
      --config.model.sparse.top_p=0.1813745116814971

Reproduce ``records/2026-11-26-sparse-attention-distill/`` (from the repo root; its
README.md lists the exact commands, with the calibration grids and a longer run):

  python -m experiments.sparse_sweep --out=records/2026-11-26-sparse-attention-distill \\
      --seeds=0,1
  python -m experiments.sparse_sweep --out=records/2026-11-26-sparse-attention-distill \\
      --settings=d10 --seeds=0 --steps=300

The first trains the teacher (as ``python -m experiments.train
--config=experiments/configs/sparse_attention.py:teacher --workdir=<out>/runs/teacher``),
measures the density of each ``DENSITIES`` setting on the teacher, evaluates the
teacher under each mask (no fine-tuning), then distils each setting per seed, e.g.

  python -m experiments.train --config=experiments/configs/sparse_attention.py:ablation \\
      --workdir=runs/sparse-d10 --config.model.sparse.top_p=0.05 \\
      --config.model.sparse.sink_blocks=0
"""
from experiments.configs import base, unknown_arg

TEACHER = "records/2026-11-26-sparse-attention-distill/runs/teacher"

# Mask settings of the record: label -> model.sparse overrides. The hybrid rule
# with the paper's top_k = 0.03 (at least one block per row) and top_p chosen so the
# teacher's masks keep about 50 / 25 / 10% of the causally valid blocks (measured:
# 0.513 / 0.269 / 0.100 on two eval batches; the record lists the calibration).
# d10 drops the sink block: with 32 key blocks per row the diagonal alone is 6.1%
# of the causal triangle and diagonal + sink 11.7%. "dense" is the control: sparse
# off, the teacher distilled into itself for as many steps.
DENSITIES = {
    "dense": dict(enabled=False),
    "d50": dict(enabled=True, top_k=0.03, top_p=0.8, sink_blocks=1, local_blocks=0),
    "d25": dict(enabled=True, top_k=0.03, top_p=0.3, sink_blocks=1, local_blocks=0),
    "d10": dict(enabled=True, top_k=0.03, top_p=0.05, sink_blocks=0, local_blocks=0),
}


# The hybrid-rule record (records/2026-11-29-sparge-hybrid-mask, SpargeAttention2's
# Table 1): top-k alone, top-p alone and their union (the paper's top_k 0.03), each
# calibrated on teacher_long's masks at seq 2048 to keep 10% of the causally valid
# blocks (only the diagonal forced). experiments/sparse_hybrid.py calibrates them
# itself (the record's calibration.json); these are its values, for the CLI. top_k
# is used as ceil(top_k x valid blocks), so keep every digit.
HYBRID_RUNS = "records/2026-11-29-sparge-hybrid-mask/runs"
HYBRID = {
    "top_k": dict(enabled=True, top_k=0.06172839738428593, top_p=0.0, sink_blocks=0,
                  local_blocks=0),
    "top_p": dict(enabled=True, top_k=0.0, top_p=0.1813745116814971, sink_blocks=0,
                  local_blocks=0),
    "union": dict(enabled=True, top_k=0.03, top_p=0.14341025706380606, sink_blocks=0,
                  local_blocks=0),
}
ARGS = ("tiny", "teacher", "ablation", "teacher_long", "ablation_long")


def _model(c, seq_len: int, block: int, batch: int = 8):
  c.model.update(dict(d_model=96, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256))
  c.data.seq_len, c.data.batch_size = seq_len, batch
  c.model.sparse.block_q = c.model.sparse.block_k = block


def _long(c, arg: str):
  """seq 2048 (128 key blocks of 16 per row), batch 2: as many tokens per step as
  ``teacher``; fine-tuned from a run's weights (``distill.teacher``)."""
  _model(c, seq_len=2048, block=16, batch=2)
  c.train.eval_batches = 4
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 5
  c.train.steps = 40 if arg == "teacher_long" else 20
  steps = c.train.steps
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 5, steps, steps
  c.train.keep_checkpoints = 1
  if arg == "teacher_long":
    c.distill.teacher, c.distill.loss = f"{HYBRID_RUNS}/teacher", "ce"
  else:
    c.model.sparse.update(HYBRID["union"])
    c.distill.teacher, c.distill.loss = f"{HYBRID_RUNS}/teacher_long", "kl"
  return c


def get_config(arg: str = "tiny"):
  if arg not in ARGS:
    raise unknown_arg("sparse_attention.py", arg, ARGS)
  c = base.get_config("tiny")
  c.name = f"sparse-attention-{arg}"
  if arg == "tiny":
    c.data.seq_len = 128
    c.model.sparse.update(dict(enabled=True, block_q=16, block_k=16, top_k=0.1, top_p=0.5,
                               sink_blocks=1))
    return c
  if arg.endswith("_long"):
    return _long(c, arg)
  _model(c, seq_len=512, block=16)
  c.train.eval_batches = 8
  if arg == "teacher":
    c.train.steps = 400
    c.optimizer.learning_rate = 3e-3
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 20, 100, 400
    c.train.keep_checkpoints = 1
    return c
  # The student: fine-tuned from the teacher's weights under the mask.
  c.model.sparse.update(DENSITIES["d25"])
  c.distill.teacher = TEACHER
  c.distill.loss = "kl"
  c.train.steps = 100
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 10, 50, 100
  c.train.keep_checkpoints = 1
  return c
