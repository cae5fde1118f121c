"""Drafts for speculative decoding, by name (``--draft=``).

- ``layers:N``: the target's first N blocks with its final norm and head
  (self-speculation: no extra weights; Elhoushi et al. 2024 train for it, we do not).
- ``sparse`` or ``sparse:P``: the target with block-sparse softmax attention decoded
  by the causal per-token rule (``attention.cache``): key blocks of ``SPARSE_BLOCK``
  tokens, top-p = P (default 0.5), the sink and previous block always kept.
- ``quant:Q`` (Q = int8, int4, fp8, optionally ``gN`` for groups of N inputs, e.g.
  ``quant:int4g128``): the target with its weights quantized by ``lm.quant`` (held
  dequantized: this measures acceptance, not the memory a quantized kernel saves).
- a workdir: another trained run; it must share the target's tokenizer and vocabulary.

``DRAFTS`` is open: a new kind is one entry ``fn(target: Model, arg: str, ctx: dict)
-> Model``.
"""
import dataclasses

from attention.spec import BlockSparse
from core.errors import ConfigError
from lm.decode import Model

SPARSE_BLOCK = 16


def first_layers(target: Model, arg: str, ctx: dict) -> Model:
  L = target.cfg.n_layers
  try:
    n = int(arg)
  except ValueError:
    n = -1
  if not 1 <= n <= L:
    raise ConfigError("--draft", f"layers:{arg}", f"the target has {L} layers",
                      f"use layers:N with 1 <= N <= {L} (e.g. layers:{max(L // 2, 1)})")
  keep = lambda tree: {k: v for k, v in tree.items()
                       if not (k.startswith("block_") and int(k.split("_")[1]) >= n)}
  cfg = dataclasses.replace(target.cfg, n_layers=n)
  return Model.from_weights(cfg, keep(target.params), keep(target.state))


def sparse_attention(target: Model, arg: str, ctx: dict) -> Model:
  cfg = target.cfg
  if "S" not in cfg.layer_pattern:
    raise ConfigError("--draft", "sparse", "the target has no softmax attention layer",
                      "use --draft=layers:N or another run")
  if cfg.hierarchical is not None:
    raise ConfigError("--draft", "sparse", "the target uses hierarchical attention, which "
                      "excludes block-sparse attention", "use --draft=layers:N")
  try:
    top_p = float(arg) if arg else 0.5
  except ValueError:
    top_p = -1.0
  if not 0.0 < top_p <= 1.0:
    raise ConfigError("--draft", f"sparse:{arg}", "top-p must be in (0, 1]",
                      "use e.g. --draft=sparse:0.5")
  bs = BlockSparse(block_q=1, block_k=SPARSE_BLOCK, top_k=0.0, top_p=top_p, sink_blocks=1,
                   local_blocks=1)
  return Model.from_weights(dataclasses.replace(cfg, sparse=bs), target.params, target.state)


def other_run(target: Model, path: str, ctx: dict) -> Model:
  from lm import config as config_lib
  from lm import runs
  from lm.data import tokenizers
  cfg = config_lib.resolve(runs.load_config(path, flag="--draft"))
  own = ctx.get("tokenizer")
  if own is not None and cfg.data.source != "synthetic":
    tok = tokenizers.load(cfg.data.tokenizer)
    if tok.sha256 != own.sha256:
      raise ConfigError("--draft", path, f"its tokenizer ({tok.name}) is not the target's "
                        f"({own.name})", "draft with a run trained with the same tokenizer")
  if cfg.model.vocab_size != target.cfg.vocab_size:
    raise ConfigError("--draft", path, f"its vocabulary ({cfg.model.vocab_size}) is not "
                      f"the target's ({target.cfg.vocab_size})",
                      "draft with a run of the same tokenizer and vocab_size")
  w = runs.load_weights(path, devices=ctx.get("devices"), flag="--draft")
  return Model.from_weights(w.config.model, w.params, w.model_state)


def quantized(target: Model, arg: str, ctx: dict) -> Model:
  import jax
  from lm import quant
  from lm.model import build_model
  weight, _, group = arg.partition("g")
  try:
    cfg = quant.QuantConfig(weight=weight, group_size=int(group or 0))
  except (ConfigError, ValueError):
    raise ConfigError("--draft", f"quant:{arg}", "not a weight type with an optional group",
                      "use quant:int8, quant:int4, quant:int4g128 or quant:fp8") from None
  if cfg.weight == "none":
    raise ConfigError("--draft", f"quant:{arg}", "quantizes nothing",
                      "use quant:int8, quant:int4, quant:int4g128 or quant:fp8")
  axes = build_model(target.cfg, 0, abstract=True).axes["params"]
  try:
    quant.check_shapes(cfg, target.params, axes)
  except ConfigError as e:
    raise ConfigError("--draft", f"quant:{arg}", str(e).split(". Fix:")[0],
                      "use a group size dividing every input dimension, or none") from None
  params = jax.jit(lambda p: quant.quantize_params(p, axes, cfg))(target.params)
  return Model.from_weights(target.cfg, params, target.state)


DRAFTS = {"layers": first_layers, "sparse": sparse_attention, "quant": quantized}


def make(spec: str, target: Model, ctx: dict | None = None) -> Model:
  """The draft named by ``spec`` (module docstring) for ``target``."""
  ctx = ctx or {}
  name, _, arg = spec.partition(":")
  if name in DRAFTS:
    return DRAFTS[name](target, arg, ctx)
  if not spec:
    raise ConfigError("--draft", spec, "empty", "use layers:N, sparse[:P] or a run's workdir")
  import os
  if os.path.isdir(spec):
    return other_run(target, spec, ctx)
  raise ConfigError("--draft", spec, "neither a draft kind nor a directory",
                    f"use {', '.join(f'{k}:...' for k in DRAFTS)} or a trained run's workdir")
