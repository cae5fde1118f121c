"""Experiment configs: the ml-collections ConfigDict -> frozen dataclasses, once.

``resolve(config)`` converts every group into its typed dataclass: the libraries'
(``moe.config.MoEConfig``, ``attention.linear.LinearConfig``,
``attention.spec.BlockSparse`` / ``Hierarchical``, ``optim.chain.OptimizerConfig``),
the loss terms' (``lm.losses``) and the runtime's below. Each dataclass checks its
own fields; a bad value stops with one line naming the full field path
(``model.moe.top_k=9: exceeds num_experts=4. Fix: ...``). ``check`` then keeps
only what crosses groups (mesh x model, data x model). Every field must be in the
config (``experiments/configs/base.py`` holds them all): nothing here repeats a
default.
"""
import dataclasses
import json
import os
import sys
import types
import typing

import ml_collections

from attention.layer import CONTEXT_PARALLEL
from attention.linear import LinearConfig
from attention.ops import REGISTRY as ATTENTION
from attention.spec import BlockSparse, Hierarchical
from core.errors import ConfigError, check_choice, check_int, check_range
from lm import data as data_lib
from lm.lora import LoraConfig
from lm.prune import PruneConfig
from lm.quant import QuantConfig
from moe.config import MoEConfig
from optim.chain import OptimizerConfig

DTYPES = ("float32", "bfloat16", "float16")
PROGRESS = ("auto", "bar", "log")
# model.remat: what a block saves for the backward pass (jax.checkpoint_policies, see
# lm.model.remat_policy); the rest is recomputed there. none: everything (no
# recomputation); full: only the block's input; dots: every matmul output;
# dots_no_batch: the projections' and FFN's matmul outputs, not attention's batched
# score / value products; offload: those outputs moved to host memory and back.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
MIXERS = "SL"  # S: softmax attention, L: linear attention


def _positive(obj, *names: str) -> None:
  for name in names:
    check_int(name, getattr(obj, name), 1)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (``lm.sharding``); -1 fills the remaining devices."""
  dcn: int
  data: int
  fsdp: int
  expert: int
  sequence: int
  tensor: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder (``lm.model``). See ``experiments/configs/base.py`` for each field."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  tie_embeddings: bool
  rope_theta: float
  norm_eps: float
  dtype: str
  param_dtype: str
  attention_impl: str
  remat: str
  scan_layers: bool
  layer_pattern: str
  linear: LinearConfig
  sliding_window: int
  sparse: BlockSparse | None = dataclasses.field(metadata={"enabled_by": "enabled"})
  hierarchical: Hierarchical | None = dataclasses.field(metadata={"enabled_by": "block"})
  context_parallel: str
  heads_per_stage: int
  qkv_conv: int
  moe: MoEConfig
  # Not a config field: the roles whose matmul inputs are int8-quantized, set by
  # ``resolve`` from the quant group (``lm.quant.QuantConfig.act_roles``).
  act_quant: tuple = dataclasses.field(default=(), metadata={"derived": True})

  def __post_init__(self):
    _positive(self, "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
              "heads_per_stage")
    check_int("vocab_size", self.vocab_size, 0)
    check_int("head_dim", self.head_dim, 0)
    if self.n_heads % self.n_kv_heads:
      raise ConfigError("n_kv_heads", self.n_kv_heads,
                        f"must divide n_heads={self.n_heads} (grouped-query attention)",
                        "choose n_kv_heads among the divisors of n_heads")
    if not self.head_dim and self.d_model % self.n_heads:
      raise ConfigError("head_dim", self.head_dim,
                        f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
                        "set model.head_dim explicitly or make d_model a multiple of n_heads")
    if self.head_size % 2:
      raise ConfigError("head_dim", self.head_size, "RoPE needs an even head dim",
                        "use an even head_dim")
    for name in ("dtype", "param_dtype"):
      check_choice(name, getattr(self, name), DTYPES)
    check_choice("attention_impl", self.attention_impl, ATTENTION.names())
    check_choice("remat", self.remat, REMAT_POLICIES)
    if not self.layer_pattern or set(self.layer_pattern) - set(MIXERS):
      raise ConfigError("layer_pattern", self.layer_pattern,
                        "must be a non-empty string of S and L",
                        "use e.g. S (softmax), L (linear) or LLLS (hybrid, cycled over layers)")
    check_int("sliding_window", self.sliding_window, 0)
    check_int("qkv_conv", self.qkv_conv, 0)
    check_choice("context_parallel", self.context_parallel, CONTEXT_PARALLEL)
    if self.hierarchical is not None:
      if self.attention_impl not in ("xla", "blocked"):
        raise ConfigError("attention_impl", self.attention_impl,
                          "hierarchical attention has two implementations: blocked and xla",
                          "use blocked (the block-skipping path) or xla (its dense twin)")
      for other, on in (("sparse.enabled", self.sparse is not None),
                        ("sliding_window", self.sliding_window)):
        if on:
          raise ConfigError("hierarchical.block", self.hierarchical.block,
                            f"hierarchical attention excludes model.{other}",
                            f"set model.hierarchical.block=0 or turn model.{other} off")
    if self.qkv_conv and self.context_parallel == "headwise":
      raise ConfigError("qkv_conv", self.qkv_conv, "headwise context parallelism projects "
                        "q, k, v per stage, without the convolution",
                        "set model.qkv_conv=0 or use context_parallel=ulysses|ring|zigzag")
    if self.sparse is not None and self.context_parallel != "none":
      raise ConfigError("context_parallel", self.context_parallel,
                        "context parallelism does not support block-sparse attention",
                        "set model.context_parallel=none or model.sparse.enabled=False")

  @property
  def head_size(self) -> int:
    """``head_dim``, or ``d_model // n_heads`` when it is 0."""
    return self.head_dim or self.d_model // self.n_heads

  def mixer(self, layer: int) -> str:
    """``S`` (softmax attention) or ``L`` (linear attention): ``layer_pattern`` cycled."""
    return self.layer_pattern[layer % len(self.layer_pattern)]


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Synthetic tasks (``lm.data``): mqar or copy."""
  task: str
  num_pairs: int
  num_queries: int
  copy_len: int
  vocab: int
  spread: bool


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The input pipeline (``lm.data``); sources, mixtures and stages are checked there
  (``lm.data.check``), tokenizer files when the data are built."""
  source: str
  path: str
  field: str
  column: str
  eval_path: str
  tokenizer: str
  bos: bool
  eos: bool
  seq_len: int
  batch_size: int
  val_fraction: float
  shuffle_seed: int
  shuffle_window: int
  workers: int
  mixture: dict[str, data_lib.SourceConfig]
  stages: typing.Any
  synthetic: SyntheticConfig

  def __post_init__(self):
    _positive(self, "seq_len", "batch_size")
    check_range("val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop (``lm.loop``)."""
  steps: int
  log_every: int
  eval_every: int
  eval_batches: int
  checkpoint_every: int
  keep_checkpoints: int
  progress: str
  plot: bool
  tensorboard: bool
  init_from: str
  peak_tflops: float
  profile_steps: tuple[int, ...]
  xla_flags: str

  def __post_init__(self):
    _positive(self, "steps", "log_every", "eval_every", "eval_batches",
              "checkpoint_every", "keep_checkpoints")
    check_choice("progress", self.progress, PROGRESS)
    check_range("peak_tflops", self.peak_tflops, 0.0, float("inf"))
    bad = [f for f in self.xla_flags.split() if not f.startswith("--xla_")]
    if bad:
      raise ConfigError("xla_flags", self.xla_flags, f"{bad[0]!r} is not an XLA flag",
                        "give space-separated flags like --xla_gpu_enable_triton_gemm=false")
    steps = self.profile_steps
    if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
      raise ConfigError("profile_steps", steps, "must be () or (first, last) with "
                        "1 <= first <= last", "use e.g. (10, 12) to trace steps 10 to 12")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole experiment, typed. ``losses`` maps each loss term's config group name
  (``lm.losses.TERMS``) to its config."""
  name: str
  seed: int
  target_topology: str
  mesh: MeshConfig
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  optimizer: OptimizerConfig
  quant: QuantConfig
  prune: PruneConfig
  lora: LoraConfig
  losses: dict = dataclasses.field(default_factory=dict)
  # Not a config field: the typed configs of other runs the loss terms read (a
  # distillation teacher), by workdir, set by ``lm.experiment.build``
  # (``Term.run_paths``).
  runs: dict = dataclasses.field(default_factory=dict, metadata={"derived": True})


# ----------------------------------------------------------------------------- conversion


def _is_optional(tp) -> tuple[bool, object]:
  args = typing.get_args(tp)
  if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
    rest = [a for a in args if a is not type(None)]
    return True, rest[0]
  return False, tp


def _value(tp, value, path: str, metadata=None):
  optional, tp = _is_optional(tp)
  if dataclasses.is_dataclass(tp):
    switch = (metadata or {}).get("enabled_by")
    if switch is not None:
      if not isinstance(value, ml_collections.ConfigDict) or switch not in value:
        raise ConfigError(f"{path}.{switch}", None, "missing from the config",
                          "add it (see experiments/configs/base.py)")
      if not value[switch]:
        return None
      if switch not in {f.name for f in dataclasses.fields(tp)}:
        value = ml_collections.ConfigDict({k: v for k, v in value.items() if k != switch})
    return convert(tp, value, path)
  if optional and value is None:
    return None
  origin = typing.get_origin(tp)
  if origin is dict:  # {name: group}: a ConfigDict of groups of one dataclass
    item = typing.get_args(tp)[1]
    if not isinstance(value, (ml_collections.ConfigDict, dict)):
      raise ConfigError(path, value, "must be a config group of named groups",
                        "see experiments/configs/mixture.py")
    return {k: _group(item, value[k], f"{path}.{k}") for k in value}
  if origin is tuple:
    item = typing.get_args(tp)[0]
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, item) and not isinstance(v, bool) for v in value):
      return tuple(value)
    if item is int:
      raise ConfigError(path, value, "must be a tuple of integers", "use e.g. (10, 12)")
    raise ConfigError(path, value, "must be a tuple of names", "use e.g. ('vocab',)")
  if tp is bool:
    ok = isinstance(value, bool)
  elif tp is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif tp is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif tp is str:
    ok = isinstance(value, str)
  else:
    ok = True
  if not ok:
    what = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}[tp]
    raise ConfigError(path, value, f"must be {what}", f"set --config.{path} to {what}")
  return value


def _group(cls, node, path: str):
  """``cls`` from a group whose fields may be left at ``cls``'s defaults."""
  if not isinstance(node, (ml_collections.ConfigDict, dict)):
    raise ConfigError(path, node, "must be a config group", "see experiments/configs/mixture.py")
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(node) - names)
  if unknown:
    raise ConfigError(f"{path}.{unknown[0]}", node[unknown[0]], "not a field of this group",
                      f"use {', '.join(sorted(names))}")
  for f in dataclasses.fields(cls):
    if f.name not in node and f.default is dataclasses.MISSING:
      raise ConfigError(f"{path}.{f.name}", None, "missing from the config",
                        "add it (see experiments/configs/mixture.py)")
  full = {f.name: node[f.name] if f.name in node else f.default for f in dataclasses.fields(cls)}
  return convert(cls, ml_collections.ConfigDict(full), path)


def convert(cls, node, path: str):
  """``cls(**node)`` with every field type-checked; errors name ``path.field``."""
  if not isinstance(node, ml_collections.ConfigDict):
    raise ConfigError(path, node, "must be a config group", "see experiments/configs/base.py")
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if (f.name == "losses" and cls is ExperimentConfig) or f.metadata.get("derived"):
      continue
    if f.name not in node:
      raise ConfigError(f"{path}.{f.name}" if path else f.name, None, "missing from the config",
                        "add it (see experiments/configs/base.py)")
    kwargs[f.name] = _value(hints[f.name], node[f.name], f"{path}.{f.name}" if path else f.name,
                            f.metadata)
  try:
    return cls(**kwargs)
  except ConfigError as e:
    raise e.within(path) from None


def resolve(config: ml_collections.ConfigDict) -> ExperimentConfig:
  """The typed, checked ``ExperimentConfig`` of a ConfigDict (see the module doc)."""
  from lm import losses
  known = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"losses"}
  groups = {t.group: t for t in losses.TERMS.values() if t.group}
  unknown = sorted(set(config.keys()) - known - set(groups))
  if unknown:
    raise ConfigError(unknown[0], config[unknown[0]], "not a config field or group",
                      f"remove it, or use one of {', '.join(sorted(known | set(groups)))}")
  typed = convert(ExperimentConfig, config, "")
  term_configs = {}
  for group, term in groups.items():
    if group not in config:
      raise ConfigError(group, None, "missing from the config (a loss term's group)",
                        "add it (see experiments/configs/base.py)")
    term_configs[group] = convert(term.Config, config[group], group)
  typed = dataclasses.replace(typed, losses=term_configs, model=dataclasses.replace(
      typed.model, act_quant=typed.quant.act_roles))
  check(typed)
  return typed


# ----------------------------------------------------------------------------- cross-cutting


def check(cfg: ExperimentConfig) -> None:
  """What crosses groups: mesh x model, data x model, adapters x the rest; and the data
  group's sources."""
  data_lib.check(cfg.data)
  _check_lora(cfg)
  m, mesh, T = cfg.model, cfg.mesh, cfg.data.seq_len
  if m.moe.enabled and mesh.expert > 1 and m.moe.num_experts % mesh.expert:
    raise ConfigError("model.moe.num_experts", m.moe.num_experts,
                      f"not divisible by mesh.expert={mesh.expert}",
                      f"use a multiple of {mesh.expert} experts or a mesh.expert dividing "
                      f"{m.moe.num_experts}")
  seq = mesh.sequence
  if m.context_parallel != "none" and seq > 1:
    if m.context_parallel in ("ulysses", "headwise") and m.n_heads % seq:
      raise ConfigError("model.n_heads", m.n_heads, f"not divisible by mesh.sequence={seq} "
                        f"({m.context_parallel} gives each device whole heads)",
                        f"use a multiple of {seq} heads, a mesh.sequence dividing it, or ring")
    if m.context_parallel == "headwise" and m.n_heads % (seq * m.heads_per_stage):
      raise ConfigError("model.heads_per_stage", m.heads_per_stage,
                        f"mesh.sequence={seq} x heads_per_stage must divide n_heads={m.n_heads}",
                        "choose heads_per_stage >= 1 dividing n_heads / mesh.sequence")
    if T % seq:
      raise ConfigError("data.seq_len", T, f"not divisible by mesh.sequence={seq}",
                        f"use a multiple of {seq}")
    if m.context_parallel == "zigzag" and T % (2 * seq):
      raise ConfigError("data.seq_len", T, f"not divisible by 2 x mesh.sequence={seq} (zigzag "
                        "gives each device two chunks)",
                        f"use a multiple of {2 * seq}, or model.context_parallel=ring")
  if m.hierarchical is not None and T % m.hierarchical.block:
    raise ConfigError("model.hierarchical.block", m.hierarchical.block,
                      f"must divide data.seq_len={T}",
                      "choose a block size dividing the sequence length, or 0 for off")
  if m.sparse is not None:
    for name in ("block_q", "block_k"):
      b = getattr(m.sparse, name)
      if T % b:
        raise ConfigError(f"model.sparse.{name}", b, f"does not divide data.seq_len={T}",
                          f"choose a block size dividing {T}, or a seq_len multiple of {b}")


def _check_lora(cfg: ExperimentConfig) -> None:
  lora = cfg.lora
  if not lora.on:
    if lora.base_quant != "none":
      raise ConfigError("lora.base_quant", lora.base_quant, "quantizes LoRA's base, but "
                        "lora.init_from is empty", "set lora.init_from to the base run's "
                        "workdir (QLoRA), or lora.base_quant=none")
    return
  if cfg.train.init_from:
    raise ConfigError("train.init_from", cfg.train.init_from, "is set beside "
                      "lora.init_from (the base of the adapters)",
                      "leave train.init_from empty when training adapters")
  if cfg.prune.method != "none":
    raise ConfigError("prune.method", cfg.prune.method, "cannot prune LoRA's frozen base "
                      "or its adapters", "prune the merged run (experiments.export, then "
                      "experiments.prune), or set prune.method=none")
  if cfg.quant.mode == "qat" and cfg.quant.on:
    raise ConfigError("quant.mode", "qat", "quantization-aware training of LoRA's merged "
                      "weights is not supported", "quantize the base with "
                      "lora.base_quant (QLoRA), or use quant.mode=ptq")


def resolve_vocab(vocab_size: int, tokenizer_vocab: int) -> int:
  """The model's vocabulary: the config's, or the tokenizer's padded to a multiple of 128."""
  if vocab_size == 0:
    return -(-tokenizer_vocab // 128) * 128
  if vocab_size < tokenizer_vocab:
    raise ConfigError("model.vocab_size", vocab_size,
                      f"smaller than the tokenizer's vocabulary ({tokenizer_vocab})",
                      f"use 0 (automatic) or a value >= {tokenizer_vocab}")
  return vocab_size


# ----------------------------------------------------------------------------- runs read back

BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments", "configs", "base.py")


def _leaves(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict) and value and key != "mixture":
      yield from _leaves(value, path + ".")
    else:
      yield path, value


def _tokenizer_spec(spec: str, workdir: str) -> str:
  """The run's tokenizer: named ones as they are; a file path if it still exists, else
  the copy ``lm.loop`` keeps in the workdir."""
  if spec in ("byte", "bpe") or not spec or os.path.exists(os.path.expanduser(spec)):
    return spec
  copy = os.path.join(workdir, "tokenizer" + os.path.splitext(spec)[1])
  if os.path.exists(copy):
    return copy
  raise ConfigError("data.tokenizer", spec, f"the run's tokenizer file is gone and {workdir} "
                    "holds no copy", "pass --config.data.tokenizer=<the tokenizer file>")


def load_run_config(workdir: str, overrides: dict | None = None,
                    flag: str = "--workdir", merged: bool = True) -> ml_collections.ConfigDict:
  """The run's config (``config.json`` over the base defaults), then ``overrides``.
  ``merged``: a LoRA run reads back as its merged model (``lora.init_from`` cleared;
  ``lm.runs.latest_model`` merges its weights)."""
  from experiments import configs
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise ConfigError(flag, workdir, "no such directory", "pass the workdir of a trained run")
  if not os.path.isfile(path):
    raise ConfigError(flag, workdir, "has no config.json (not a Kestrel run)",
                      "pass the workdir that experiments.train wrote")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(flag, workdir, f"config.json cannot be read ({e})",
                      "pass the workdir of a finished run") from None
  config = configs.load(BASE_CONFIG)
  assignments = {}
  for dotted, value in _leaves(saved):
    if dotted.startswith("_"):
      continue
    if dotted == "data.mixture":
      with config.unlocked():
        config.data.mixture = ml_collections.ConfigDict(value)
      continue
    if isinstance(value, list):
      value = _tuples(value)
    assignments[dotted] = value
  known, unknown = {}, []
  for dotted, value in assignments.items():
    try:
      configs.override(config, {dotted: value})
      known[dotted] = value
    except ConfigError:
      unknown.append(dotted)
  config = configs.override(config, known)
  if unknown:  # a field this version does not have (or of another type): keep the rest
    print(f"note: {workdir}/config.json fields not applied: {', '.join(unknown[:5])}",
          file=sys.stderr)
  config.data.tokenizer = _tokenizer_spec(config.data.tokenizer, workdir)
  config = configs.override(config, overrides or {})
  if config.quant.weight != "none" or config.quant.act != "none":
    config.quant.mode = "qat"  # read back: the forward quantizes (see the module doc)
  if merged and config.lora.init_from:
    config.lora.init_from = ""
    config.lora.base_quant = "none"
  return config


def _tuples(value):
  return tuple(_tuples(v) if isinstance(v, list) else v for v in value)
