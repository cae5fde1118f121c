"""Mixture-of-experts balancing: Switch's load-balancing loss and ST-MoE's router
z-loss, summed over the MoE layers with ``model.moe``'s coefficients.

The layers sow their statistics (``moe.layer``: ``load``, ``dropped``, ``lb_loss``,
``z_loss``), which the logs carry per block (``moe/<block>/...``) and averaged over
blocks; ``summarize`` adds each layer's load coefficient of variation (of the load
averaged over the logging interval) and their mean, ``moe/load_cv``.
"""
import jax.numpy as jnp
import numpy as np

from lm.losses.base import Forward, Term
from moe.router import load_cv


class MoEBalance(Term):
  name = "moe"

  def __init__(self, cfg):
    self.cfg = cfg

  @classmethod
  def build(cls, config, model):
    return cls(config.model.moe) if config.model.moe.enabled else None

  def loss(self, out: Forward, batch, aux):
    stats = out.stats.get("moe", {})
    if not stats:
      return jnp.zeros((), jnp.float32), {}
    lb = sum(s["lb_loss"] for s in stats.values())
    z = sum(s["z_loss"] for s in stats.values())
    return self.cfg.load_balance_coef * lb + self.cfg.z_loss_coef * z, {}

  def summarize(self, record: dict) -> dict:
    cvs = {key[:-len("/load")] + "/load_cv": float(load_cv(np.asarray(value)))
           for key, value in record.items()
           if key.startswith("moe/block_") and key.endswith("/load")}
    if cvs:
      cvs["moe/load_cv"] = float(np.mean(list(cvs.values())))
    return cvs
