"""Muon's matrix group (Jordan 2024, "modded-nanogpt"; Liu et al. 2025, "Muon is
Scalable for LLM Training"), assembled from optax 0.2.8 pieces in the order of
``optax.contrib.muon``'s muon group:
``scale_by_muon -> scale_by_shape -> add_decayed_weights -> scale_by_learning_rate``.

``optax.contrib.scale_by_muon`` applies no shape scaling by itself (the width
factor ``sqrt(max(1, fan_out / fan_in))`` lives in the private
``optax.contrib._muon.scale_by_shape``), so ``scale_by_shape`` below restates it.
optax's momentum and normalisation run first and our Newton-Schulz
(``optim.namo.orthogonalize``) follows in ``ns_dtype`` (bf16 by default; optax's own
routine iterates in the update's dtype, one matrix at a time): all matrices of one
shape iterate as one batched matmul, and on a mesh each device orthogonalises its share
and the results are gathered (``distribute``). In float32 it equals optax's
``scale_by_muon`` matrix by matrix (tests/test_optim_chain.py).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

from core.errors import ConfigError, check_choice, check_int, check_positive, check_range
from optim import namo as namo_lib

MuonDimensionNumbers = optax_contrib.MuonDimensionNumbers
NS_DTYPES = namo_lib.NS_DTYPES


@dataclasses.dataclass(frozen=True)
class MuonConfig:
  """The Muon group's hyperparameters (``optimizer.muon``).

  Attributes:
    learning_rate: peak learning rate of the matrix group (the schedule's shape is
      the optimizer's).
    momentum: Nesterov / heavy-ball momentum.
    nesterov: Nesterov momentum.
    ns_steps: Newton-Schulz iterations.
    weight_decay: decoupled weight decay of the matrices.
    consistent_rms: None: Jordan's ``sqrt(max(1, fan_out / fan_in))``; a number r:
      Moonlight's ``r * sqrt(max(fan_in, fan_out))`` (0.2 matches AdamW's update RMS).
    ns_dtype: dtype of the Newton-Schulz iterations.
    per_head: each attention head's projection is its own matrix.
    distribute: on a mesh of several devices, each device orthogonalises its share of
      the matrices and the results are gathered (``optim.namo.Spread``).
  """
  learning_rate: float = 0.02
  momentum: float = 0.95
  nesterov: bool = True
  ns_steps: int = 5
  weight_decay: float = 0.0
  consistent_rms: float | None = None
  ns_dtype: str = "bfloat16"
  per_head: bool = False
  distribute: bool = True

  def __post_init__(self):
    check_positive("learning_rate", self.learning_rate)
    check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
    check_int("ns_steps", self.ns_steps, 1)
    check_range("weight_decay", self.weight_decay, 0.0, float("inf"))
    if self.consistent_rms is not None:
      check_positive("consistent_rms", self.consistent_rms)
    check_choice("ns_dtype", self.ns_dtype, NS_DTYPES)
    for name in ("nesterov", "per_head", "distribute"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(name, getattr(self, name), "must be a bool", "use True or False")


def _fans(shape: tuple[int, ...], dim_nums: MuonDimensionNumbers) -> tuple[int, int]:
  """(fan_in, fan_out): products of the reduction and output axis sizes."""
  fan_in = fan_out = 1
  for ax in dim_nums.reduction_axis:
    fan_in *= shape[ax]
  for ax in dim_nums.output_axis:
    fan_out *= shape[ax]
  return fan_in, fan_out


def _is_dim_nums(x: Any) -> bool:
  return isinstance(x, MuonDimensionNumbers)


def scale_by_shape(dimension_numbers: Any,
                   consistent_rms: float | None = None) -> optax.GradientTransformation:
  """Scales each orthogonalised update by a factor of its matrix shape.

  ``consistent_rms=None``: ``sqrt(max(1, fan_out / fan_in))`` (Jordan's Muon;
  what ``optax.contrib.muon`` applies by default). A float ``r``:
  ``r * sqrt(max(fan_in, fan_out))`` (Liu et al. 2025, matching AdamW's update
  RMS with ``r = 0.2``). Fans exclude batch axes.

  Args:
    dimension_numbers: pytree like the (masked) updates with
      ``MuonDimensionNumbers`` leaves, e.g. from ``optim.chain.muon_dimension_tree``.
    consistent_rms: optional RMS target, see above.

  Returns:
    A stateless ``optax.GradientTransformation``.
  """

  def scale(u: jax.Array, dim_nums: MuonDimensionNumbers) -> jax.Array:
    fan_in, fan_out = _fans(u.shape, dim_nums)
    if consistent_rms is None:
      factor = max(1.0, fan_out / fan_in) ** 0.5
    else:
      factor = consistent_rms * max(fan_in, fan_out) ** 0.5
    return u * jnp.asarray(factor, u.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(scale, updates, dimension_numbers, is_leaf=_is_dim_nums), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon_group(cfg: MuonConfig, schedule, dim_tree: Any,
               spread: namo_lib.Spread | None = None) -> optax.GradientTransformation:
  """The muon group: momentum + Newton-Schulz (all matrices of a shape at once, split
  over ``spread``'s devices when ``cfg.distribute``), shape scale, decay, -lr."""
  # optax's momentum and normalisation, then our Newton-Schulz (batched per shape; in
  # float32 it reproduces optax's per-matrix routine, tested).
  orthogonalised = [
      optax_contrib.scale_by_muon(ns_steps=0, beta=cfg.momentum, nesterov=cfg.nesterov,
                                  weight_dimension_numbers=dim_tree),
      namo_lib.orthogonalize(cfg.ns_steps, NS_DTYPES[cfg.ns_dtype], dim_tree,
                             spread if cfg.distribute else None)]
  return optax.chain(
      *orthogonalised,
      scale_by_shape(dim_tree, consistent_rms=cfg.consistent_rms),
      optax.add_decayed_weights(cfg.weight_decay),
      optax.scale_by_learning_rate(schedule),
  )
