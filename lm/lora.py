"""Low-rank adapters on a frozen base: the ``lora`` config group (LoRA, QLoRA).

``lora.init_from`` names a trained run (the base). Its newest weights are loaded once,
frozen, and held outside the train state (the step's ``aux``, like a distillation
teacher); the train state's ``params`` are the adapters alone, so the optimizer keeps
state for the adapters only and the checkpoints hold the adapters (and the model state,
e.g. the MoE balancing bias), not the base. Every targeted matrix W (by role, as the
``quant`` group names them: ``lm.quant.matrices``) gets

  W' = W + (alpha / rank) * A @ B,   A: [inputs, rank] (small random), B: [rank, outputs] = 0

(Hu et al. 2021; B = 0, so the model at initialisation is the base exactly). The
contraction (input) axes of W are A's, its output axes B's; batch axes (stacked
experts) are kept on both, so an adapter of a stacked weight is one adapter per
expert and never a copy of the base. Adapters carry the base's logical axes (the rank
axis unsharded), so they shard like the weights they adapt.

The forward sees the merged weights (``Lora.forward``, an update hook): every layer,
grouped-matmul backend and mesh runs unchanged, and the gradient reaches A and B
through the merge. The merged weights are transient in the step (a full-size weight per
adapted matrix while the step runs): an unmerged path, x W + s (x A) B inside the layers,
would avoid that and the full-size weight gradient, and is not written.

``dropout``: dropped input features of the adapter path, one mask per step shared by
every token (so the adapter still merges into the weight); the paper's per-token
dropout of x needs the unmerged path.

QLoRA (Dettmers et al. 2023): ``base_quant`` int4 | nf4 | int8 quantizes the targeted
base matrices group-wise (``base_group_size`` inputs per scale) once when the base is
loaded; the aux holds their codes (int4 / uint4 for nf4 / int8) and fp32 scales, and the
forward dequantizes them before adding the adapters.

A LoRA run read back (``lm.runs.latest_model``: evaluate, generate, export,
``train.init_from``) is its merged model (``lm.runs.read_merged``); ``experiments.export`` writes it as a plain
run. DPO's reference with LoRA is the base with the adapters off (``Lora.base``).
"""
import dataclasses
import math
import os
import zlib

import jax
import jax.numpy as jnp
import qwix
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from core import quant as q
from core.errors import ConfigError, check_choice, check_int, check_range
from lm import hooks
from lm.quant import (ROLES, check_matrices, check_targets, get_path, matrices, merged_shape,
                      set_path)

BASE_QUANT = ("none", "int8", "int4", "nf4")
DEFAULT_TARGETS = ("attention", "mlp", "experts", "linear")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The ``lora`` group (module docstring). On when ``init_from`` is set.

  Attributes:
    init_from: the base: a trained run's workdir ("" = off).
    rank: r, the adapters' inner dimension (>= 1).
    alpha: the update is scaled by alpha / rank.
    dropout: share of the adapter path's input features dropped per step (training).
    targets: the roles adapted (``lm.quant.ROLES``).
    base_quant: QLoRA: none | int8 | int4 | nf4 (the frozen base, group-wise).
    base_group_size: inputs per scale of the quantized base (0: one per output channel).
  """
  init_from: str = ""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  base_quant: str = "none"
  base_group_size: int = 64

  def __post_init__(self):
    check_int("rank", self.rank, 1)
    check_range("alpha", self.alpha, 0.0, float("inf"), lo_open=True)
    check_range("dropout", self.dropout, 0.0, 1.0)
    if self.dropout >= 1.0:
      raise ConfigError("dropout", self.dropout, "must be < 1", "use e.g. 0.05, or 0")
    check_targets("targets", self.targets, ROLES)
    check_choice("base_quant", self.base_quant, BASE_QUANT)
    check_int("base_group_size", self.base_group_size, 0)

  @property
  def on(self) -> bool:
    return bool(self.init_from)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _positions(m, ndim: int) -> tuple[tuple, tuple, tuple]:
  """(batch, contraction, output) axis positions of a weight."""
  outputs = tuple(i for i in range(ndim) if i not in m.batch and i not in m.contract)
  return tuple(m.batch), tuple(m.contract), outputs


def _put(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def adapter_shapes(params: dict, axes: dict, cfg: LoraConfig) -> tuple[dict, dict]:
  """(ShapeDtypeStructs, logical axes) of the adapters: ``{path...: {"a", "b"}}`` per
  targeted matrix (``params`` may be arrays or ShapeDtypeStructs)."""
  shapes, names = {}, {}
  for path, m in matrices(axes, cfg.targets).items():
    w, ax = get_path(params, path), tuple(get_path(axes, path))
    b, c, o = _positions(m, len(w.shape))
    pick = lambda idx, src: tuple(src[i] for i in idx)
    a_shape = pick(b, w.shape) + pick(c, w.shape) + (cfg.rank,)
    b_shape = pick(b, w.shape) + (cfg.rank,) + pick(o, w.shape)
    _put(shapes, path, {"a": jax.ShapeDtypeStruct(a_shape, w.dtype),
                        "b": jax.ShapeDtypeStruct(b_shape, w.dtype)})
    _put(names, path, {"a": pick(b, ax) + pick(c, ax) + (None,),
                       "b": pick(b, ax) + (None,) + pick(o, ax)})
  return shapes, names


def delta(w_shape: tuple, m, a: jax.Array, b: jax.Array) -> jax.Array:
  """A @ B laid out like the weight (shape ``w_shape``): summed over the rank, batch
  axes kept."""
  bp, cp, op = _positions(m, len(w_shape))
  nb = len(bp)
  C = math.prod(w_shape[i] for i in cp)
  O = math.prod(w_shape[i] for i in op)
  lead = tuple(w_shape[i] for i in bp)
  d = jnp.einsum("...cr,...ro->...co", a.reshape(lead + (C, a.shape[-1])),
                 b.reshape(lead + (b.shape[nb], O)))
  d = d.reshape(lead + tuple(w_shape[i] for i in cp) + tuple(w_shape[i] for i in op))
  order = bp + cp + op  # position in d of each weight axis: the inverse permutation
  return jnp.transpose(d, [order.index(i) for i in range(len(w_shape))])


def init_adapters(params: dict, axes: dict, cfg: LoraConfig, seed: int) -> dict:
  """A ~ U(-1/sqrt(inputs), 1/sqrt(inputs)) (one key per matrix, from its path), B = 0."""
  shapes, _ = adapter_shapes(params, axes, cfg)
  out = {}
  key = jax.random.key(seed)
  for path, m in matrices(axes, cfg.targets).items():
    s = get_path(shapes, path)
    k = jax.random.fold_in(key, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)
    fan_in = math.prod(s["a"].shape[len(m.batch):-1])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(k, s["a"].shape, jnp.float32, -bound, bound).astype(s["a"].dtype)
    _put(out, path, {"a": a, "b": jnp.zeros(s["b"].shape, s["b"].dtype)})
  return out


# ----------------------------------------------------------------------------- the base


def quantize_base(w: jax.Array, m, cfg: LoraConfig) -> dict:
  """QLoRA's stored form of one base matrix: {"q": codes in the weight's shape,
  "scale": fp32 scales over groups of the flattened contraction}."""
  shape, c = merged_shape(tuple(w.shape), m)
  qa = q.quantize(w.reshape(shape), cfg.base_quant, c, cfg.base_group_size)
  return {"q": qa.qvalue.reshape(w.shape), "scale": qa.scale}


def dequantize_base(stored: dict, m, cfg: LoraConfig, dtype) -> jax.Array:
  w_shape = stored["q"].shape
  shape, _ = merged_shape(tuple(w_shape), m)
  qa = qwix.QArray(stored["q"].reshape(shape), stored["scale"], None,
                   q.QTYPES[cfg.base_quant])
  return qwix.dequantize(qa).reshape(w_shape).astype(dtype)


class Lora(hooks.Hook):
  """``lora.init_from`` set: the train state's parameters are the adapters; the forward
  sees the base (the step's ``aux["lora"]``) plus the adapters' low-rank updates."""
  name = "lora"

  def __init__(self, cfg: LoraConfig, model, seed: int):
    self.cfg, self.model, self.seed = cfg, model, seed
    self.axes = model.axes["params"]
    self.mats = matrices(self.axes, cfg.targets)
    self.adapter_abstract, self.adapter_axes = adapter_shapes(model.params, self.axes, cfg)

  @classmethod
  def build(cls, config, model):
    cfg = config.lora
    if not cfg.on:
      return None
    if not os.path.isdir(cfg.init_from):
      raise ConfigError("lora.init_from", cfg.init_from, "no such directory",
                        "pass the workdir of the trained run to adapt")
    check_matrices(model.params, model.axes["params"], cfg.targets,
                   cfg.base_group_size if cfg.base_quant != "none" else 0,
                   "lora.targets", "lora.base_group_size")
    return cls(cfg, model, config.seed)

  # -- the train state holds the adapters

  def trainable(self, abstract_params, axes):
    return self.adapter_abstract, self.adapter_axes

  def init(self, params):
    return init_adapters(self.model.params, self.axes, self.cfg, self.seed), None

  # -- the frozen base

  def base(self, aux) -> dict:
    """The base's parameters (QLoRA: dequantized), the forward with adapters off."""
    params = aux["params"]
    if self.cfg.base_quant == "none":
      return params
    for path, m in self.mats.items():
      dtype = get_path(self.model.params, path).dtype
      params = set_path(params, path, dequantize_base(get_path(params, path), m, self.cfg,
                                                      dtype))
    return params

  def merge(self, base_params: dict, adapters: dict, rng=None) -> dict:
    """The base's parameters plus the adapters' updates; ``rng`` (training): the
    adapters' input-feature dropout."""
    out = base_params
    keep = 1.0 - self.cfg.dropout
    for path, m in self.mats.items():
      w, ad = get_path(base_params, path), get_path(adapters, path)
      a = ad["a"]
      if rng is not None and self.cfg.dropout > 0:
        k = jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)
        mask = jax.random.bernoulli(k, keep, a.shape[:-1] + (1,))
        a = jnp.where(mask, a / keep, 0.0).astype(a.dtype)
      d = delta(w.shape, m, a, ad["b"]) * self.cfg.scale
      out = set_path(out, path, (w + d.astype(w.dtype)))
    return out

  def forward(self, params, aux=None, rng=None):
    return self.merge(self.base(aux), params, rng)

  def quantize(self, params: dict) -> dict:
    """QLoRA: the base's parameters with the targets in their stored form."""
    for path, m in self.mats.items():
      params = set_path(params, path, quantize_base(get_path(params, path), m, self.cfg))
    return params

  def stored_abstract(self, abstract_params: dict) -> dict:
    """The aux's parameter tree: the base's, QLoRA's targets as codes and scales."""
    if self.cfg.base_quant == "none":
      return abstract_params
    out = abstract_params
    for path, m in self.mats.items():
      w = get_path(abstract_params, path)
      s = jax.eval_shape(lambda x, m=m: quantize_base(x, m, self.cfg),
                         jax.ShapeDtypeStruct(w.shape, w.dtype))
      mesh = w.sharding.mesh
      out = set_path(out, path, {
          "q": jax.ShapeDtypeStruct(s["q"].shape, s["q"].dtype, sharding=w.sharding),
          "scale": jax.ShapeDtypeStruct(s["scale"].shape, s["scale"].dtype,
                                        sharding=NamedSharding(mesh, P()))})
    return out

  def _abstract_base(self, abstract_model):
    from lm import sharding
    return {"params": sharding.abstract_model(self.model, abstract_model)["params"],
            "model_state": abstract_model["model_state"]}

  def abstract_aux(self, abstract_model):
    base = self._abstract_base(abstract_model)
    return {"params": self.stored_abstract(base["params"]),
            "model_state": base["model_state"]}

  def load_aux(self, abstract_model, read):
    base = self._abstract_base(abstract_model)
    try:
      model, step = read(self.cfg.init_from, base, "lora.init_from")
    except ConfigError as e:
      if "does not fit" not in e.problem:
        raise
      raise ConfigError("lora.init_from", self.cfg.init_from, "is another architecture: "
                        + e.problem.split(": ", 1)[-1], "use the base run's model group "
                        "(experiments/configs/finetune.py:<base workdir> copies it)") from None
    params = model["params"]
    if self.cfg.base_quant != "none":
      shardings = jax.tree.map(lambda s: s.sharding, self.stored_abstract(base["params"]))
      params = jax.jit(self.quantize, out_shardings=shardings)(params)
    how = f", base {self.cfg.base_quant} g{self.cfg.base_group_size}" \
        if self.cfg.base_quant != "none" else ""
    return ({"params": params, "model_state": model["model_state"]},
            f"LoRA r={self.cfg.rank} on {self.cfg.init_from} (step {step}{how})")

  def initial_model(self, aux):
    # adapters are made from shapes (``init``); the model state is the base's
    return {"params": None, "model_state": aux["model_state"]}


def tree_bytes(tree) -> int:
  """Bytes of a tree of arrays (or ShapeDtypeStructs): adapters, weights, optimizer state."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
