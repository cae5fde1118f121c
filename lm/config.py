"""Validation and resolution of experiment configs: every bad value stops with one line."""
import ml_collections

from lm.errors import ConfigError

_POSITIVE_INTS = (
    "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff",
    "data.seq_len", "data.batch_size", "train.steps", "train.log_every",
    "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.keep_checkpoints")
_CHOICES = {
    "optimizer.name": ("adamw", "muon", "namo", "namo_d"),
    "optimizer.schedule": ("cosine", "wsd", "constant"),
    "data.source": ("embedded", "files", "synthetic"),
    "train.progress": ("auto", "bar", "log"),
    "model.linear.variant": ("ssd", "mamba2s", "2mamba"),
    "model.context_parallel": ("none", "ulysses", "headwise", "ring"),
    "model.moe.score": ("softmax", "sigmoid"),
    "model.moe.dispatch": ("dropless", "dropping", "reference"),
    "model.moe.gmm_impl": ("auto", "ragged_dot", "pallas", "pallas_gpu", "megablox", "xla"),
    "model.moe.expert_parallel": ("none", "ragged", "fixed"),
}


def get(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields every run needs; raises ConfigError naming the first bad one."""
  for field in _POSITIVE_INTS:
    value = get(config, field)
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(field, value, "must be a positive integer", f"set --config.{field}=N, N > 0")
  for field, choices in _CHOICES.items():
    value = get(config, field)
    if value not in choices:
      raise ConfigError(field, value, "unknown choice", f"use one of {', '.join(choices)}")
  m = config.model
  if m.n_heads % m.n_kv_heads:
    raise ConfigError("model.n_kv_heads", m.n_kv_heads,
                      f"must divide model.n_heads={m.n_heads} (grouped-query attention)",
                      "choose n_kv_heads among the divisors of n_heads")
  head_dim = m.head_dim or m.d_model // m.n_heads
  if m.head_dim < 0 or (not m.head_dim and m.d_model % m.n_heads):
    raise ConfigError("model.head_dim", m.head_dim,
                      f"d_model={m.d_model} is not divisible by n_heads={m.n_heads}",
                      "set model.head_dim explicitly or make d_model a multiple of n_heads")
  if head_dim % 2:
    raise ConfigError("model.head_dim", head_dim, "RoPE needs an even head dim",
                      "use an even head_dim")
  if m.vocab_size < 0:
    raise ConfigError("model.vocab_size", m.vocab_size, "must be >= 0",
                      "use 0 for the tokenizer's vocabulary or a positive size")
  _validate_moe(config)
  _validate_long_context(config)
  _validate_sparse(config)
  _validate_distill(config)
  if not 0 < config.optimizer.learning_rate:
    raise ConfigError("optimizer.learning_rate", config.optimizer.learning_rate,
                      "must be positive", "set a learning rate > 0")


def resolve_vocab(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> int:
  """The model's vocabulary: config value, or the tokenizer's padded to a multiple of 128."""
  v = config.model.vocab_size
  if v == 0:
    return -(-tokenizer_vocab // 128) * 128
  if v < tokenizer_vocab:
    raise ConfigError("model.vocab_size", v,
                      f"smaller than the tokenizer's vocabulary ({tokenizer_vocab})",
                      f"use 0 (automatic) or a value >= {tokenizer_vocab}")
  return v


def _validate_moe(config: ml_collections.ConfigDict) -> None:
  moe = config.model.get("moe")
  if moe is None or moe.num_experts == 0:
    return
  E = moe.num_experts
  for field in ("num_experts", "every", "top_k"):
    value = moe[field]
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(f"model.moe.{field}", value, "must be a positive integer",
                        f"set --config.model.moe.{field}=N, N > 0 (num_experts=0: dense model)")
  for field in ("d_ff", "num_shared"):
    if not isinstance(moe[field], int) or moe[field] < 0:
      raise ConfigError(f"model.moe.{field}", moe[field], "must be an integer >= 0",
                        f"set --config.model.moe.{field}=N, N >= 0")
  if moe.top_k > E:
    raise ConfigError("model.moe.top_k", moe.top_k, f"exceeds model.moe.num_experts={E}",
                      "lower top_k or add experts")
  if not moe.capacity_factor > 0:
    raise ConfigError("model.moe.capacity_factor", moe.capacity_factor, "must be > 0",
                      "use 1.0-1.25 (Switch), or model.moe.dispatch=dropless for no capacity")
  expert_axis = config.mesh.get("expert", 1)
  if expert_axis > 1 and E % expert_axis:
    raise ConfigError("model.moe.num_experts", E, f"not divisible by mesh.expert={expert_axis}",
                      f"use a multiple of {expert_axis} experts or a mesh.expert dividing {E}")
  if moe.expert_parallel != "none" and moe.dispatch != "dropless":
    raise ConfigError("model.moe.expert_parallel", moe.expert_parallel,
                      f"needs model.moe.dispatch=dropless (got {moe.dispatch!r})",
                      "set --config.model.moe.dispatch=dropless or expert_parallel=none")
  for field in ("load_balance_coef", "z_loss_coef", "bias_update_rate"):
    if moe[field] < 0:
      raise ConfigError(f"model.moe.{field}", moe[field], "must be >= 0", "use 0 to disable")


def _validate_long_context(config: ml_collections.ConfigDict) -> None:
  m = config.model
  pattern = m.get("layer_pattern", "S")
  if not pattern or set(pattern) - set("SL"):
    raise ConfigError("model.layer_pattern", pattern, "must be a non-empty string of S and L",
                      "use e.g. S (softmax), L (linear) or LLLS (hybrid, cycled over layers)")
  if "L" in pattern and not (isinstance(m.linear.chunk_size, int) and m.linear.chunk_size > 0):
    raise ConfigError("model.linear.chunk_size", m.linear.chunk_size, "must be a positive integer",
                      "use e.g. 64")
  cp = m.get("context_parallel", "none")
  seq = config.mesh.get("sequence", 1)
  if cp == "none" or seq <= 1:
    return
  if cp in ("ulysses", "headwise") and m.n_heads % seq:
    raise ConfigError("model.n_heads", m.n_heads, f"not divisible by mesh.sequence={seq} "
                      f"({cp} gives each device whole heads)",
                      f"use a multiple of {seq} heads, a mesh.sequence dividing it, or ring")
  if cp == "headwise" and (m.heads_per_stage < 1 or m.n_heads % (seq * m.heads_per_stage)):
    raise ConfigError("model.heads_per_stage", m.heads_per_stage,
                      f"mesh.sequence={seq} x heads_per_stage must divide n_heads={m.n_heads}",
                      "choose heads_per_stage >= 1 dividing n_heads / mesh.sequence")
  if config.data.seq_len % seq:
    raise ConfigError("data.seq_len", config.data.seq_len, f"not divisible by mesh.sequence={seq}",
                      f"use a multiple of {seq}")


def _validate_sparse(config: ml_collections.ConfigDict) -> None:
  m = config.model
  if m.get("sliding_window", 0) < 0:
    raise ConfigError("model.sliding_window", m.sliding_window, "must be >= 0",
                      "use 0 for full causal attention or a window length in tokens")
  h = m.get("hierarchical")
  if h is not None and h.block:
    if not isinstance(h.block, int) or h.block < 0 or config.data.seq_len % h.block:
      raise ConfigError("model.hierarchical.block", h.block,
                        f"must be a positive integer dividing data.seq_len={config.data.seq_len}",
                        "choose a block size dividing the sequence length, or 0 for off")
    if not isinstance(h.local_blocks, int) or h.local_blocks < 0:
      raise ConfigError("model.hierarchical.local_blocks", h.local_blocks,
                        "must be an integer >= 0", "use e.g. 1")
    if m.attention_impl not in ("xla", "blocked"):
      raise ConfigError("model.attention_impl", m.attention_impl,
                        "hierarchical attention has two implementations: blocked and xla",
                        "use blocked (the block-skipping path) or xla (its dense twin)")
    others = [f for f, on in (("model.sparse.enabled", m.get("sparse") and m.sparse.enabled),
                              ("model.sliding_window", m.get("sliding_window", 0))) if on]
    if others:
      raise ConfigError("model.hierarchical.block", h.block,
                        f"hierarchical attention excludes {others[0]}",
                        f"set model.hierarchical.block=0 or turn {others[0]} off")
  sp = m.get("sparse")
  if sp is None or not sp.enabled:
    return
  T = config.data.seq_len
  for field in ("block_q", "block_k"):
    b = sp[field]
    if not isinstance(b, int) or b <= 0:
      raise ConfigError(f"model.sparse.{field}", b, "must be a positive integer",
                        "use e.g. 64 (128 on TPU)")
    if T % b:
      raise ConfigError(f"model.sparse.{field}", b, f"does not divide data.seq_len={T}",
                        f"choose a block size dividing {T}, or a seq_len multiple of {b}")
  for field in ("top_k", "top_p"):
    if not 0.0 <= sp[field] <= 1.0:
      raise ConfigError(f"model.sparse.{field}", sp[field], "out of range; it is a fraction",
                        f"choose {field} in [0, 1]")
  for field in ("sink_blocks", "local_blocks"):
    if not isinstance(sp[field], int) or sp[field] < 0:
      raise ConfigError(f"model.sparse.{field}", sp[field], "must be an integer >= 0",
                        "use 0 to keep none")
  if m.get("context_parallel", "none") != "none" and config.mesh.get("sequence", 1) > 1:
    raise ConfigError("model.context_parallel", m.context_parallel,
                      "context parallelism does not support block-sparse attention",
                      "set model.context_parallel=none or model.sparse.enabled=False")


def _validate_distill(config: ml_collections.ConfigDict) -> None:
  """``distill.*`` (lm/distill.py); the teacher's folder is checked when it is read."""
  d = config.get("distill")
  if d is None:
    return
  if not isinstance(d.teacher, str):
    raise ConfigError("distill.teacher", d.teacher, "must be a path (a string)",
                      "pass a dense run's workdir, or \"\" for no distillation")
  if d.loss not in ("kl", "kl+ce"):
    raise ConfigError("distill.loss", d.loss, "unknown choice", "use one of kl, kl+ce")
  if not d.temperature > 0:
    raise ConfigError("distill.temperature", d.temperature, "must be > 0",
                      "use 1.0 (the plain distributions) or another positive value")
  if not d.ce_weight >= 0:
    raise ConfigError("distill.ce_weight", d.ce_weight, "must be >= 0",
                      "use a non-negative weight (distill.loss=kl ignores it)")
