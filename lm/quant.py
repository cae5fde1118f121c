"""Weight and activation quantization: the ``quant`` config group.

Which matrices: ``targets`` names logical roles (``matrices``): ``attention`` (q, k, v,
o of softmax layers), ``mlp`` (a dense layer's gate/up/down and the MoE layers'
shared experts), ``experts`` (the routed experts' stacked gate/up/down, quantized per
expert), ``linear`` (linear-attention q, k, v, o and the dt / decay projections) and
``head`` (the unembedding when it is its own matrix; a tied head is the embedding,
and embeddings are never quantized). Router weights, norms, biases and convolutions
stay in full precision.

How: ``weight`` int8 | int4 | fp8 with symmetric absmax scales (``core.quant``, on
qwix's numerics) along each matrix's contraction (input) axes: one scale per output
channel (``group_size=0``) or per ``group_size`` consecutive inputs (group-wise; a
matrix whose contraction spans two axes, e.g. the output projection's heads x
head_dim, is grouped over the flattened input). ``act=int8`` quantizes the inputs of
the targeted matmuls per token (the layers' ``act_quant``, set from here by
``lm.config``): w8a8 with ``weight=int8``.

When: ``mode=ptq`` (post-training): training ignores the group; a run read back
(``lm.runs``: evaluate, generate, quantize) is run quantized. ``mode=qat``
(quantization-aware training): every training and eval forward sees fake-quantized
weights (the ``Quant`` hook, ``lm.hooks``) and activations, with a straight-through
gradient; the fp32 master weights are what the optimizer updates and the checkpoint
keeps. (Reading back sets ``mode=qat`` for its forward: a trained run evaluated
quantized is PTQ.)

Stored form (``experiments.quantize``): per quantized matrix its integer values
(int4 packed two per byte, low nibble first, along the last axis) and fp32 scales;
``load_stored`` rebuilds the dequantized parameters exactly as ``quantize_params``
makes them.
"""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from core import quant as q
from core.errors import ConfigError, check_choice, check_int
from lm import hooks

WEIGHTS = ("none", "int8", "int4", "fp8")
ACTS = ("none", "int8")
MODES = ("ptq", "qat")
ROLES = ("attention", "mlp", "experts", "linear", "head")


def check_targets(field: str, targets: tuple, roles: tuple = ROLES) -> None:
  unknown = [t for t in targets if t not in roles]
  if unknown:
    raise ConfigError(field, targets, f"{unknown[0]!r} is not a role",
                      f"use some of {', '.join(roles)}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """The ``quant`` group (module docstring).

  Attributes:
    weight: none | int8 | int4 | fp8.
    act: none | int8 (dynamic, per token, on the targeted matmuls' inputs).
    group_size: 0: one scale per output channel; else one per this many consecutive
      inputs (must divide each targeted matrix's input dimension).
    mode: ptq (quantize a trained run when it is read back) | qat (train quantized).
    targets: the roles quantized.
  """
  weight: str = "none"
  act: str = "none"
  group_size: int = 0
  mode: str = "ptq"
  targets: tuple[str, ...] = ROLES

  def __post_init__(self):
    check_choice("weight", self.weight, WEIGHTS)
    check_choice("act", self.act, ACTS)
    check_choice("mode", self.mode, MODES)
    check_int("group_size", self.group_size, 0)
    check_targets("targets", self.targets)

  @property
  def act_roles(self) -> tuple:
    """The roles whose matmul inputs the forward quantizes (``ModelConfig.act_quant``):
    with ``act=int8`` in ``qat`` mode."""
    return tuple(self.targets) if self.act == "int8" and self.mode == "qat" else ()

  @property
  def on(self) -> bool:
    return self.weight != "none" or self.act != "none"


@dataclasses.dataclass(frozen=True)
class Matrix:
  """A weight matrix of the model: its role, its contraction axes (contiguous) and
  its batch axes (experts; scanned layers)."""
  role: str
  contract: tuple
  batch: tuple


def _role(path: tuple, siblings: dict) -> str | None:
  name = path[-1]
  if path == ("head",):
    return "head"
  if path[:1] == ("blocks",):  # scanned layers (lm.model): blocks/block_<j>/...
    path = path[1:]
  if len(path) < 3 or not path[0].startswith("block_"):
    return None
  if path[1] == "attn":
    if "w_A" in siblings or "A_log" in siblings:  # a linear layer's decay (attention.linear)
      return "linear" if name in ("q", "k", "v", "o", "w_dt", "w_A") else None
    return "attention" if name in ("q", "k", "v", "o") else None
  if path[1] == "mlp":
    if name in ("shared_gate", "shared_up", "shared_down"):
      return "mlp"
    if name in ("gate", "up", "down"):
      return "experts" if "router" in siblings else "mlp"
  return None


def leaves(tree: dict, path: tuple = ()):
  """(path tuple, leaf, the dict holding it) of every leaf of nested dict ``tree``."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from leaves(value, path + (key,))
    else:
      yield path + (key,), value, tree


def matrices(axes: dict, targets: tuple = ROLES) -> dict:
  """{path tuple: Matrix} of the parameters (given by their logical ``axes`` tree,
  ``lm.model.Built.axes["params"]``) whose role is in ``targets``."""
  out = {}
  for p, names, parent in leaves(axes):
    role = _role(p, parent)
    if role is None or role not in targets:
      continue
    names = tuple(names)
    batch = tuple(i for i, n in enumerate(names) if n in ("expert", "layers"))
    if names[-1] == "embed":  # a projection back into the residual: all inputs
      contract = tuple(i for i in range(len(names) - 1) if i not in batch)
    else:
      contract = (names.index("embed"),)
    out[p] = Matrix(role, contract, batch)
  return out


def get_path(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree: dict, path: tuple, value) -> dict:
  """A copy of nested dict ``tree`` with ``path`` replaced (other leaves shared)."""
  if not path:
    return value
  return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}


def merged_shape(shape, m: Matrix):
  """(shape with the contraction axes merged into one, that axis)."""
  c0, c1 = m.contract[0], m.contract[-1]
  return shape[:c0] + (math.prod(shape[c0:c1 + 1]),) + shape[c1 + 1:], c0


def check_matrices(params: dict, axes: dict, targets: tuple, group_size: int,
                   targets_field: str, group_field: str) -> None:
  """``targets`` names a matrix of the model, and ``group_size`` (0: none) divides every
  targeted matrix's input dimension; errors name ``targets_field`` / ``group_field``."""
  mats = matrices(axes, targets)
  if not mats:
    raise ConfigError(targets_field, targets, "names no weight matrix of this model",
                      f"use some of {', '.join(ROLES)} that the model has")
  for path, m in (mats.items() if group_size else ()):
    shape, c = merged_shape(tuple(get_path(params, path).shape), m)
    if shape[c] % group_size:
      raise ConfigError(group_field, group_size,
                        f"does not divide the input dimension {shape[c]} of "
                        f"{'/'.join(path)}",
                        f"use a divisor of {shape[c]} (or 0: per output channel), or drop "
                        f"{m.role!r} from {targets_field}")


def check_shapes(cfg: QuantConfig, params: dict, axes: dict) -> None:
  """``quant.targets`` names a matrix of the model, and ``quant.group_size`` divides
  every targeted matrix's input dimension."""
  if cfg.weight != "none":
    check_matrices(params, axes, cfg.targets, cfg.group_size, "quant.targets",
                   "quant.group_size")


def fake_quant_matrix(w: jax.Array, m: Matrix, qtype: str, group: int) -> jax.Array:
  shape, c = merged_shape(w.shape, m)
  return q.fake_quant(w.reshape(shape), qtype, c, group).reshape(w.shape)


def quantize_params(params: dict, axes: dict, cfg: QuantConfig) -> dict:
  """``params`` with every targeted matrix fake-quantized (straight-through gradient);
  the rest shared. Identity when ``cfg.weight`` is none."""
  if cfg.weight == "none":
    return params
  for path, m in matrices(axes, cfg.targets).items():
    params = set_path(params, path, fake_quant_matrix(get_path(params, path), m, cfg.weight,
                                                  cfg.group_size))
  return params


class Quant(hooks.Hook):
  """``quant.mode=qat`` with a weight type: the forward sees fake-quantized weights."""
  name = "quant"

  def __init__(self, cfg: QuantConfig, axes: dict):
    self.cfg, self.axes = cfg, axes

  @classmethod
  def build(cls, config, model):
    cfg = config.quant
    if cfg.mode != "qat" or cfg.weight == "none":
      return None
    check_shapes(cfg, model.params, model.axes["params"])
    return cls(cfg, model.axes["params"])

  def forward(self, params, aux=None, rng=None):
    return quantize_params(params, self.axes, self.cfg)


# ----------------------------------------------------------------------------- stored form


def pack_int4(values: np.ndarray) -> np.ndarray:
  """int values in [-8, 7] -> uint8, two per byte along the last axis (low nibble
  first; an odd last axis is padded with one zero)."""
  v = np.asarray(values, np.int8)
  if v.shape[-1] % 2:
    v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), np.int8)], axis=-1)
  u = (v.astype(np.uint8) & 0x0F)
  return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
  """``pack_int4``'s inverse: int8 values, last axis cut to ``n``."""
  p = np.asarray(packed, np.uint8)
  lo, hi = (p & 0x0F).astype(np.int8), (p >> 4).astype(np.int8)
  v = np.stack([lo, hi], axis=-1).reshape(p.shape[:-1] + (-1,))[..., :n]
  return np.where(v > 7, v - 16, v).astype(np.int8)


def store(params: dict, axes: dict, cfg: QuantConfig) -> tuple[dict, dict]:
  """(arrays, manifest) of the quantized checkpoint: ``arrays`` maps
  ``<path>`` to a full-precision array (not targeted) or ``<path>.q`` (integers;
  int4 packed) and ``<path>.scale``; the manifest records how."""
  mats = matrices(axes, cfg.targets)
  arrays, entries = {}, {}
  for p, value, _ in leaves(params):
    name = "/".join(p)
    if p not in mats:
      arrays[name] = np.asarray(jax.device_get(value))
      continue
    shape, c = merged_shape(tuple(value.shape), mats[p])
    qa = q.quantize(jnp.asarray(value).reshape(shape), cfg.weight, c, cfg.group_size)
    values = np.asarray(jax.device_get(qa.qvalue))
    if cfg.weight == "int4":
      values = pack_int4(values.astype(np.int8))
    elif cfg.weight == "fp8":
      values = values.view(np.uint8)
    arrays[name + ".q"] = values
    arrays[name + ".scale"] = np.asarray(jax.device_get(qa.scale), np.float32)
    entries[name] = {"shape": list(value.shape), "dtype": str(value.dtype),
                     "merged": list(shape), "axis": c}
  manifest = {"weight": cfg.weight, "group_size": cfg.group_size,
              "targets": list(cfg.targets), "matrices": entries}
  return arrays, manifest


def _dequantize(values: np.ndarray, scale: np.ndarray, entry: dict, qtype: str) -> np.ndarray:
  merged = tuple(entry["merged"])
  if qtype == "int4":
    ints = unpack_int4(values, merged[-1]).astype(jnp.int4)
  elif qtype == "fp8":
    ints = values.view(jnp.float8_e4m3fn)
  else:
    ints = values.astype(np.int8)
  qa = qwix.QArray(jnp.asarray(ints), jnp.asarray(scale), None, q.QTYPES[qtype])
  w = qwix.dequantize(qa)
  return w.reshape(entry["shape"]).astype(entry["dtype"])


def _nested(flat: dict) -> dict:
  """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
  out = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def load_stored(arrays, manifest: dict) -> dict:
  """The parameters (nested dict of jax arrays, dequantized) of a stored checkpoint."""
  names = {k.rsplit(".", 1)[0] if k.endswith((".q", ".scale")) else k for k in arrays}
  return _nested({name: _dequantize(arrays[name + ".q"], arrays[name + ".scale"],
                                    manifest["matrices"][name], manifest["weight"])
                  if name in manifest["matrices"] else jnp.asarray(arrays[name])
                  for name in sorted(names)})


STORED = "quantized.npz"
MANIFEST = "quantized.json"


def write_stored(out: str, arrays: dict, manifest: dict, model_state: dict) -> None:
  """Writes ``out/quantized.npz`` and ``out/quantized.json`` atomically (temporary
  files renamed into place)."""
  flat = {f"params/{k}": v for k, v in arrays.items()}
  flat.update({"state/" + "/".join(p): np.asarray(jax.device_get(v))
               for p, v, _ in leaves(model_state)})
  tmp = os.path.join(out, STORED + ".tmp.npz")
  np.savez(tmp, **flat)
  os.replace(tmp, os.path.join(out, STORED))
  with open(os.path.join(out, MANIFEST + ".tmp"), "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(os.path.join(out, MANIFEST + ".tmp"), os.path.join(out, MANIFEST))


def read_stored(workdir: str) -> tuple[dict, dict, dict]:
  """(params, model_state, manifest) of a quantized checkpoint written by
  ``write_stored`` (host arrays; the caller places them)."""
  with open(os.path.join(workdir, MANIFEST)) as f:
    manifest = json.load(f)
  with np.load(os.path.join(workdir, STORED)) as data:
    arrays = {k[len("params/"):]: data[k] for k in data.files if k.startswith("params/")}
    state = _nested({k[len("state/"):]: jnp.asarray(data[k]) for k in data.files
                     if k.startswith("state/")})
  return load_stored(arrays, manifest), state, manifest


def is_stored(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, STORED))


def weight_bytes(params: dict, axes: dict, cfg: QuantConfig | None = None,
                 packed: bool = True) -> int:
  """Bytes of ``params`` with the targeted matrices stored as ``cfg`` says (int4
  packed two per byte, or one per byte with ``packed=False`` as qwix holds it in
  memory) plus their fp32 scales; everything else at its own dtype."""
  mats = matrices(axes, cfg.targets) if cfg is not None and cfg.weight != "none" else {}
  total = 0
  for p, value, _ in leaves(params):
    if p in mats:
      shape, c = merged_shape(tuple(value.shape), mats[p])
      n = math.prod(shape)
      groups = shape[c] // cfg.group_size if cfg.group_size else 1
      per = 0.5 if (cfg.weight == "int4" and packed) else 1
      total += int(math.ceil(n * per)) + 4 * (n // shape[c]) * groups
    else:
      total += math.prod(value.shape) * jnp.dtype(value.dtype).itemsize
  return total
