"""Cached decoding: prefill a batch of prompts, then one token per step.

``Decoder`` holds a model's weights and the decode-time version of its config:
MoE layers dispatch dropless (a token is never dropped, whatever the batch) and do
not update their balancing bias; everything else is the trained model. Its cache is
``lm.model.Transformer.init_cache``'s: per softmax layer a key/value cache of the
kv heads (a ring of window + slack slots for sliding-window layers,
``attention.cache``; with ``model.qkv_conv`` also the conv's last inputs), per
linear-attention layer the conv inputs and the recurrent state; ``lengths`` [B] says
how many tokens each row holds. Rows have their own lengths, so prompts of different
lengths need no left padding and keep the positions they had in training. Caches are
bf16 by default (recurrent states fp32).

``generate`` runs the whole decode loop as one ``lax.while_loop`` under ``jax.jit``
with the cache donated; with stop strings it runs in chunks and checks the text on
the host between them. ``lm.decode.speculative`` adds drafts.

On a mesh the cache is sharded like activations: rows over the batch axes, kv heads
(and linear-attention heads) over ``tensor``; rows are padded to a multiple of the
batch axes' size.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.errors import ConfigError
from lm import sharding
from lm.decode.sampling import Sampling, row_keys, sample
from lm.model import DTYPES, build_model, is_scanned, unscan_tree

CACHE_AXES = {  # logical axes of each cache leaf by name (lengths: [B])
    "k": ("batch", None, "kv_heads", "head_dim"), "v": ("batch", None, "kv_heads", "head_dim"),
    "k_scale": ("batch", None, "kv_heads"), "v_scale": ("batch", None, "kv_heads"),
    "conv_q": ("batch", None, "heads", "head_dim"), "conv_k": ("batch", None, "heads", "head_dim"),
    "conv_v": ("batch", None, "heads", "head_dim"),
    "qkv_conv_q": ("batch", None, "heads", "head_dim"),
    "qkv_conv_k": ("batch", None, "kv_heads", "head_dim"),
    "qkv_conv_v": ("batch", None, "kv_heads", "head_dim"),
    "S": ("batch", "heads", None, None), "z": ("batch", "heads", None),
    "lengths": ("batch",),
}


CACHE_DTYPES = {**DTYPES, "int8": jnp.int8}


def decode_config(model_cfg):
  """The config a model decodes with: dropless MoE without bias updates, no remat, layers
  unrolled (a scanned run's weights are converted: ``Model.from_weights``)."""
  moe = model_cfg.moe
  if moe.enabled:
    moe = dataclasses.replace(moe, dispatch="dropless", bias_update_rate=0.0)
  return dataclasses.replace(model_cfg, moe=moe, remat="none", scan_layers=False)


@dataclasses.dataclass
class Model:
  """A decodable model: (decode) config, graph definition, weights and other state."""
  cfg: object
  graphdef: object
  params: dict
  state: dict

  @classmethod
  def from_weights(cls, model_cfg, params, state) -> "Model":
    cfg = decode_config(model_cfg)
    built = build_model(cfg, 0, abstract=True)
    if is_scanned(params):  # weights of a scanned model: unrolled for decoding
      period = len(params["blocks"])
      params, state = unscan_tree(params, period), unscan_tree(state, period)
    return cls(cfg, built.graphdef, params, state)


def _merge(model: Model, params):
  return nnx.merge(model.graphdef, params, model.state)


def extend(model: Model, params, cache, tokens_BT, n_B, *, fresh=False, last_only=False,
           keep=()):
  """``Transformer.extend`` on explicit weights (what the layers sow is dropped)."""
  m = _merge(model, params)
  (logits, new, extras), _ = nnx.capture(m.extend, nnx.Intermediate)(
      cache, tokens_BT, n_B, fresh=fresh, last_only=last_only, keep=keep)
  return logits, new, extras


def commit(model: Model, params, old, new, inputs, n_B):
  m = _merge(model, params)
  out, _ = nnx.capture(m.commit, nnx.Intermediate)(old, new, inputs, n_B)
  return out


def init_cache(model: Model, batch: int, max_len: int, slack: int, dtype):
  m = _merge(model, model.params)
  return m.init_cache(batch, max_len, slack, dtype)


def cache_bytes(cache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


@dataclasses.dataclass(frozen=True)
class Request:
  """Prompts (token ids, any lengths) and how to continue them."""
  prompts: list
  max_new_tokens: int
  sampling: Sampling = Sampling()
  eos_id: int | None = None


class Decoder:
  """Prefill and decode steps of one model, jitted once per shape.

  Args:
    model: ``Model``.
    max_len: the longest prompt + continuation a row may reach.
    cache_dtype: ``bfloat16`` (default), ``float32``, or ``int8`` (softmax K/V as int8
      with a scale per token and kv head, ``attention.cache``: half bf16's bytes).
    slack: tokens one call may add beyond one (speculative verification: gamma).
    mesh: trace under its placement and put the cache on it (the weights are placed
      by whoever made them, e.g. ``lm.runs.load_weights``); default: unplaced.
  """

  def __init__(self, model: Model, *, max_len: int, cache_dtype: str = "bfloat16",
               slack: int = 0, mesh=None):
    if cache_dtype not in CACHE_DTYPES:
      raise ConfigError("--cache_dtype", cache_dtype, "unknown dtype",
                        f"use one of {sorted(CACHE_DTYPES)}")
    self.model, self.max_len, self.slack, self.mesh = model, max_len, slack, mesh
    self.cache_dtype = CACHE_DTYPES[cache_dtype]
    self._jits = {}

  # ----------------------------------------------------------------- placement
  @property
  def batch_multiple(self) -> int:
    if self.mesh is None:
      return 1
    spec = sharding.logical_to_spec(("batch",), (0,), dict(self.mesh.shape))
    axes = spec[0] if spec and spec[0] else ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(self.mesh.shape[a] for a in axes)

  def cache_shardings(self, cache):
    if self.mesh is None:
      return None
    sizes = dict(self.mesh.shape)

    def one(path, x):
      name = getattr(path[-1], "key", "")
      spec = sharding.logical_to_spec(CACHE_AXES[name], x.shape, sizes, what=f"cache {name}")
      return jax.sharding.NamedSharding(self.mesh, spec)
    return jax.tree_util.tree_map_with_path(one, cache)

  def _context(self):
    import contextlib
    if self.mesh is None:
      return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(sharding.placed(self.mesh))
    return stack

  def _lowered(self, jitted, args):
    with self._context():
      return jitted.lower(*args)

  def new_cache(self, batch: int):
    """An empty cache for ``batch`` rows, placed on the mesh (one compile per batch)."""
    key = ("new_cache", batch)
    if key not in self._jits:
      fn = lambda: init_cache(self.model, batch, self.max_len, self.slack, self.cache_dtype)
      self._jits[key] = jax.jit(fn, out_shardings=self.cache_shardings(jax.eval_shape(fn)))
    with self._context():
      return self._jits[key]()

  def jit(self, name, fn, donate=()):
    """``fn`` jitted once (cached by name), traced under the mesh's placement."""
    if name not in self._jits:
      jitted = jax.jit(fn, donate_argnums=donate)

      def call(*args):
        with self._context():
          return jitted(*args)
      call.lower = lambda *args: self._lowered(jitted, args)
      self._jits[name] = call
    return self._jits[name]

  # ----------------------------------------------------------------- steps
  def prefill(self, tokens_BT, lengths_B, *, all_logits: bool = False):
    """Runs prompts (right-padded [B, T], ``lengths_B`` valid each) into a new cache:
    (logits of the last prompt token [B, V] (all: [B, T, V]), cache)."""
    model = self.model
    cache = self.new_cache(tokens_BT.shape[0])
    fn = self.jit(("prefill", all_logits), lambda p, c, t, n: extend(
        model, p, c, t, n, fresh=True, last_only=not all_logits)[:2], donate=(1,))
    return fn(model.params, cache, jnp.asarray(tokens_BT, jnp.int32),
              jnp.asarray(lengths_B, jnp.int32))

  def step(self, cache, tokens_BT, n_B=None):
    """Adds tokens [B, T] (n_b valid per row, default all) to the cache: (logits
    [B, T, V], cache). The cache passed in is donated."""
    model = self.model
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    if n_B is None:
      n_B = jnp.full((tokens_BT.shape[0],), tokens_BT.shape[1], jnp.int32)
    fn = self.jit("step", lambda p, c, t, n: extend(model, p, c, t, n)[:2], donate=(1,))
    return fn(model.params, cache, tokens_BT, jnp.asarray(n_B, jnp.int32))

  # ----------------------------------------------------------------- generation
  def check_request(self, req: Request) -> None:
    if not req.prompts:
      raise ConfigError("--prompt", "", "no prompt given", "pass --prompt=... or --prompt_file")
    for i, p in enumerate(req.prompts):
      if len(p) == 0:
        raise ConfigError("--prompt", "", f"prompt {i} is empty (no tokens)",
                          "give every prompt at least one character")
      if len(p) + req.max_new_tokens > self.max_len:
        raise ConfigError("--max_new_tokens", req.max_new_tokens,
                          f"prompt {i} has {len(p)} tokens: {len(p)} + {req.max_new_tokens} "
                          f"exceeds max_len={self.max_len}",
                          "generate fewer tokens, shorten the prompt or raise --max_len")

  def pad_prompts(self, prompts):
    """(tokens [B', T], lengths [B'], B): right-padded, rows padded to the mesh."""
    B = len(prompts)
    Bp = -(-B // self.batch_multiple) * self.batch_multiple
    T = max(len(p) for p in prompts)
    T = -(-T // 8) * 8
    tokens = np.zeros((Bp, T), np.int32)
    lengths = np.ones((Bp,), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
      lengths[i] = len(p)
    return tokens, lengths, B

  def start(self, req: Request):
    """(the loop's state after the prefill and the first sampled token, real rows)."""
    self.check_request(req)
    tokens, lengths, B = self.pad_prompts(req.prompts)
    Bp = tokens.shape[0]
    logits, cache = self.prefill(tokens, lengths)
    s = req.sampling
    rows = jnp.arange(Bp, dtype=jnp.int32)
    first = sample(logits, s, row_keys(s.seed, rows, jnp.asarray(lengths)))
    eos = -1 if req.eos_id is None else req.eos_id
    width = self.max_len  # the output buffer; N is traced, so one compile serves every N
    carry = {"cache": cache, "cur": first,
             "out": jnp.zeros((Bp, width), jnp.int32).at[:, 0].set(first),
             "n": jnp.where(first == eos, 0, 1),
             "done": jnp.asarray(np.arange(Bp) >= B) | (first == eos)}
    return carry, B

  def run(self, req: Request, carry, limit: int):
    """Decode steps until every row is done or has ``limit`` tokens: (carry, steps).
    ``carry`` (from ``start`` or a previous ``run``) is donated."""
    eos = -1 if req.eos_id is None else req.eos_id
    loop = self.jit(("loop", req.sampling, eos),
                    functools.partial(_loop, self.model, req.sampling, eos), donate=(1,))
    return loop(self.model.params, carry, jnp.int32(limit), jnp.int32(req.max_new_tokens))

  def generate(self, req: Request, *, stop=None, chunk: int | None = None):
    """Continues every prompt: {"tokens": [list per row], "steps": model calls}.

    Rows stop at ``eos_id`` (not included) or after ``max_new_tokens``. ``stop``:
    a callable(row, new tokens) -> bool checked between chunks of ``chunk`` tokens
    (the caller cuts the text at its stop string)."""
    carry, B = self.start(req)
    N = req.max_new_tokens
    limit = N if stop is None else min(N, chunk or 16)
    calls = 1
    while True:
      carry, steps = self.run(req, carry, limit)
      calls += int(steps)
      n = np.asarray(carry["n"])
      done = np.asarray(carry["done"]) | (n >= N)
      if stop is not None:
        out = np.asarray(carry["out"])
        for b in range(B):
          if not done[b] and stop(b, out[b, :n[b]].tolist()):
            done[b] = True
        carry["done"] = jnp.asarray(done)
      if done[:B].all() or limit >= N:
        break
      limit = min(N, limit + (chunk or 16))
    out, n = np.asarray(carry["out"]), np.asarray(carry["n"])
    return {"tokens": [out[b, :n[b]].tolist() for b in range(B)], "steps": calls}


def deep_thinking(model: Model, prompts, continuations, *, g: float = 0.5, rho: float = 0.85,
                  chunk: int = 1024) -> list[dict]:
  """The Deep-Thinking Ratio (``lm.decode.dtr``) of each row's continuation: the logit
  lens of every layer at the positions that predicted the continuation's tokens.
  Returns per row {"dtr", "settling_depth" (list), "threshold_layer"}."""
  from lm.decode import dtr as dtr_lib
  out = []
  for prompt, cont in zip(prompts, continuations):
    if not cont:
      out.append({"dtr": None, "settling_depth": [], "threshold_layer":
                  dtr_lib.threshold_layer(model.cfg.n_layers, rho)})
      continue
    seq = jnp.asarray([list(prompt) + list(cont)], jnp.int32)
    T = seq.shape[1]
    m = _merge(model, model.params)
    cache = m.init_cache(1, T, 0, jnp.float32)

    def lens(params, cache, seq):
      mm = _merge(model, params)
      (_, _, extras), _ = nnx.capture(mm.extend, nnx.Intermediate)(
          cache, seq, jnp.full((1,), T, jnp.int32), fresh=True, keep=("hidden",))
      h_LND = extras["hidden"][:, 0, len(prompt) - 1:T - 1]
      return dtr_lib.dtr(h_LND, mm.final_norm, mm.head_matrix(), g=g, rho=rho, chunk=chunk)
    r = jax.jit(lens)(model.params, cache, seq)
    out.append({"dtr": float(r["ratio"]),
                "settling_depth": np.asarray(r["settling_depth"]).tolist(),
                "threshold_layer": dtr_lib.threshold_layer(model.cfg.n_layers, rho)})
  return out


def _loop(model, s: Sampling, eos: int, params, carry, limit, N):
  """The decode loop: feed each row's newest token, sample the next, until every row is
  done or has ``limit`` tokens. Returns (carry, model calls)."""
  rows = jnp.arange(carry["cur"].shape[0], dtype=jnp.int32)

  def cond(c):
    c, _ = c
    return jnp.any(~c["done"] & (c["n"] < limit))

  def body(c):
    c, steps = c
    live = ~c["done"] & (c["n"] < limit)
    logits, cache, _ = extend(model, params, c["cache"], c["cur"][:, None], live.astype(jnp.int32))
    nxt = sample(logits[:, 0], s, row_keys(s.seed, rows, cache["lengths"]))
    stop = nxt == eos
    put = live & ~stop
    out = c["out"].at[rows, jnp.where(put, c["n"], c["out"].shape[1])].set(nxt, mode="drop")
    n = c["n"] + put
    done = c["done"] | (live & stop) | (n >= N)
    return {"cache": cache, "cur": jnp.where(put, nxt, c["cur"]), "out": out, "n": n,
            "done": done}, steps + 1

  return jax.lax.while_loop(cond, body, (carry, jnp.int32(0)))




def compile_report(model_cfg, mesh, *, batch: int, prompt_len: int, max_len: int,
                   cache_dtype: str = "bfloat16", slack: int = 0) -> dict:
  """Lowers and compiles the prefill and one decode step for ``mesh`` (e.g. a TPU
  topology's devices, ``lm.aot.topology_devices``) with abstract weights and cache.

  Returns {"prefill" / "decode": {temp_bytes, argument_bytes, flops}, "cache_bytes":
  total, "cache_bytes_per_device"}."""
  from lm.aot import _per_device_bytes
  built = build_model(model_cfg, 0, abstract=True)
  specs = {"params": sharding.tree_specs(built.axes["params"], built.params, mesh),
           "state": sharding.tree_specs(built.axes["state"], built.state, mesh)}
  named = sharding.named(mesh, specs)
  sds = lambda tree, sh: jax.tree.map(
      lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), tree, sh)
  model = Model.from_weights(model_cfg, sds(built.params, named["params"]),
                             sds(built.state, named["state"]))
  dec = Decoder(model, max_len=max_len, cache_dtype=cache_dtype, slack=slack, mesh=mesh)
  shapes = jax.eval_shape(lambda: init_cache(model, batch, max_len, slack, dec.cache_dtype))
  cache = sds(shapes, dec.cache_shardings(shapes))
  rows = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
      ("batch", None), (batch, 1), dict(mesh.shape)))
  vec = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
      ("batch",), (batch,), dict(mesh.shape)))
  tokens = lambda T: jax.ShapeDtypeStruct((batch, T), jnp.int32, sharding=rows)
  n = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=vec)
  out = {"cache_bytes": cache_bytes(shapes), "cache_bytes_per_device": _per_device_bytes(cache)}
  steps = {
      "prefill": (lambda p, c, t, k: extend(model, p, c, t, k, fresh=True, last_only=True)[:2],
                  tokens(prompt_len)),
      "decode": (lambda p, c, t, k: extend(model, p, c, t, k)[:2], tokens(1))}
  for name, (fn, tok) in steps.items():
    compiled = dec.jit(name, fn, donate=(1,)).lower(model.params, cache, tok, n).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[name] = {"temp_bytes": int(mem.temp_size_in_bytes),
                 "argument_bytes": int(mem.argument_size_in_bytes),
                 "flops": float(cost.get("flops", float("nan")))}
  return out
