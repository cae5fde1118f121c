"""Direct preference optimization (Rafailov et al. 2023) on preference pairs.

With log pi(y|x) summed over the completion tokens (the batch's ``weights``: rows 2i,
2i + 1 are pair i's chosen and rejected sequences, ``lm.data.preference``) and

  h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)],

``dpo.loss = "sigmoid"``: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
(eps = ``label_smoothing``, conservative DPO); ``"ipo"`` (Azar et al. 2023): (h - 1 /
(2 beta))^2. Both are means over the pairs; the objective is this alone (the
cross-entropy's weight is 0; the logged ``loss`` stays the completions' cross-entropy).
At pi = pi_ref the sigmoid loss is log 2.

Metrics (``dpo/...``, and ``eval_dpo/...`` on the held-out pairs): ``loss``, ``chosen_reward`` and
``rejected_reward`` (the implicit rewards beta (log pi - log pi_ref), pair means),
``margin`` (their difference), ``reward_accuracy`` (share of pairs whose chosen reward
is the larger), ``policy_accuracy`` (share of pairs whose chosen completion the policy
itself finds more likely: at the start, whether the base already knows the rule) and
``kl``: KL(pi || pi_ref) of the next-token distributions, the mean
over completion tokens.

The reference, ``dpo.reference``, is a run's workdir (default: the run the policy
starts from: ``lora.init_from``, else ``train.init_from``); its own ``config.json``
gives its model (vocabulary and tokenizer must be the policy's). Its weights are loaded
once, frozen, outside the train state (``aux``). With LoRA on and the reference the base
of the adapters, the reference is the base with the adapters off: the LoRA hook's
frozen base is reused (the same arrays; no second copy).
"""
import dataclasses
import os

import jax
import jax.numpy as jnp

from core.errors import ConfigError, check_choice, check_positive, check_range
from lm.losses.base import Forward, Term
from lm.losses.distill import tokenizer_id
from lm.model import apply, build_model

LOSSES = ("none", "sigmoid", "ipo")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """The ``dpo`` config group.

  Attributes:
    loss: none (off) | sigmoid (DPO) | ipo.
    beta: the strength of the KL constraint (reward scale).
    reference: the reference run's workdir; "" = the run the policy starts from.
    label_smoothing: sigmoid only: eps, the assumed share of flipped labels.
  """
  loss: str = "none"
  beta: float = 0.1
  reference: str = ""
  label_smoothing: float = 0.0

  def __post_init__(self):
    check_choice("loss", self.loss, LOSSES)
    check_positive("beta", self.beta)
    check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)


def sequence_logps(logits_BTV: jax.Array, targets_BT: jax.Array,
                   weights_BT: jax.Array) -> jax.Array:
  """[B] sums of log p(target) over the weighted (completion) positions, fp32; positions
  of weight 0 contribute exactly 0."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(weights_BT > 0, logp_BT * weights_BT, 0.0), axis=-1)


def dpo_loss(policy_B: jax.Array, reference_B: jax.Array, cfg: DpoConfig):
  """(loss, metrics) from per-sequence log-probabilities of interleaved pairs (rows 2i
  chosen, 2i + 1 rejected)."""
  ratio_B = policy_B - reference_B
  chosen, rejected = ratio_B[0::2], ratio_B[1::2]
  h = chosen - rejected
  if cfg.loss == "ipo":
    loss = jnp.mean((h - 1.0 / (2.0 * cfg.beta)) ** 2)
  else:
    eps = cfg.label_smoothing
    loss = jnp.mean(-(1.0 - eps) * jax.nn.log_sigmoid(cfg.beta * h)
                    - eps * jax.nn.log_sigmoid(-cfg.beta * h))
  cr, rr = cfg.beta * chosen, cfg.beta * rejected
  return loss, {"loss": loss, "chosen_reward": jnp.mean(cr), "rejected_reward": jnp.mean(rr),
                "margin": jnp.mean(cr - rr),
                "reward_accuracy": jnp.mean((cr > rr).astype(jnp.float32)),
                "policy_accuracy": jnp.mean((policy_B[0::2] > policy_B[1::2]).astype(
                    jnp.float32))}


def token_kl(policy_BTV, reference_BTV, weights_BT) -> jax.Array:
  """Mean over weighted positions of KL(softmax(policy) || softmax(reference))."""
  lp = jax.nn.log_softmax(policy_BTV.astype(jnp.float32), axis=-1)
  lr = jax.nn.log_softmax(reference_BTV.astype(jnp.float32), axis=-1)
  kl_BT = jnp.sum(jnp.exp(lp) * (lp - lr), axis=-1)
  w = (weights_BT > 0).astype(jnp.float32)
  return jnp.sum(kl_BT * w) / jnp.maximum(jnp.sum(w), 1.0)


def reference_path(config) -> str:
  cfg = config.losses[Dpo.group]
  return cfg.reference or config.lora.init_from or config.train.init_from


def _same(a: str, b: str) -> bool:
  return bool(a) and bool(b) and os.path.abspath(a) == os.path.abspath(b)


class Dpo(Term):
  """``dpo.loss`` set: the objective is the preference loss against a frozen reference."""
  name = "dpo"
  group = "dpo"
  Config = DpoConfig
  ce_weight = 0.0

  def __init__(self, cfg: DpoConfig, reference, lora, path: str):
    self.cfg, self.reference, self.lora, self.path = cfg, reference, lora, path
    self.aux_from = "lora" if lora is not None else None

  @classmethod
  def run_paths(cls, config):
    cfg = config.losses[cls.group]
    path = reference_path(config)
    if cfg.loss == "none" or not path or _same(path, config.lora.init_from):
      return {}
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise ConfigError("dpo.reference", path, "is not a trained run (no config.json)",
                        "pass the workdir of the run the policy starts from")
    return {"dpo.reference": path}

  @classmethod
  def build(cls, config, model):
    cfg = config.losses[cls.group]
    if cfg.loss == "none":
      return None
    if config.data.source != "preference":
      raise ConfigError("dpo.loss", cfg.loss, f"needs preference pairs, but data.source="
                        f"{config.data.source!r}", "set data.source=preference and data.path "
                        "to a JSONL of prompt/chosen/rejected (or synthetic:reverse|upper)")
    path = reference_path(config)
    if not path:
      raise ConfigError("dpo.reference", "", "no reference run (and neither "
                        "lora.init_from nor train.init_from is set)",
                        "set dpo.reference, or start the policy from a run with "
                        "train.init_from (the reference by default)")
    if _same(path, config.lora.init_from):  # the base with the adapters off
      from lm.lora import Lora
      return cls(cfg, model, Lora(config.lora, model, config.seed), path)
    ref = config.runs[path]
    if ref.model.vocab_size != config.model.vocab_size or \
        tokenizer_id(ref.data) != tokenizer_id(config.data):
      raise ConfigError("dpo.reference", path, f"was trained with another tokenizer or "
                        f"vocabulary ({ref.data.tokenizer!r}, {ref.model.vocab_size} tokens; "
                        f"the policy: {config.data.tokenizer!r}, {config.model.vocab_size})",
                        "use a reference run with the policy's tokenizer")
    ref_model = dataclasses.replace(ref.model, dtype=config.model.dtype)
    return cls(cfg, build_model(ref_model, config.seed, abstract=True), None, path)

  def loss(self, out: Forward, batch, aux):
    if self.lora is not None:
      params, state = self.lora.base(aux), aux["model_state"]
    else:
      params, state = aux["params"], aux["model_state"]
    ref_logits_BTV, _, _ = apply(self.reference.graphdef, params, state, batch["inputs"])
    ref_logits_BTV = jax.lax.stop_gradient(ref_logits_BTV)
    w = batch["weights"]
    policy_B = sequence_logps(out.logits_BTV, batch["targets"], w)
    reference_B = sequence_logps(ref_logits_BTV, batch["targets"], w)
    loss, metrics = dpo_loss(policy_B, reference_B, self.cfg)
    metrics["kl"] = token_kl(jax.lax.stop_gradient(out.logits_BTV), ref_logits_BTV, w)
    return loss, metrics

  def _abstract(self, abstract_model):
    from lm import sharding
    return sharding.abstract_model(self.reference, abstract_model)

  def abstract_aux(self, abstract_model):
    return None if self.lora is not None else self._abstract(abstract_model)

  def load_aux(self, abstract_model, read=None):
    if self.lora is not None:
      return None, f"DPO reference: the LoRA base {self.path} (adapters off)"
    model, step = read(self.path, self._abstract(abstract_model), "dpo.reference")
    return model, f"DPO reference: {self.path} (step {step})"
