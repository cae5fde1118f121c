"""Mixture-of-experts LM: the base transformer with MoE feed-forward layers.

  --config=experiments/configs/moe.py:<size>
  --config.model.moe.dispatch=dropping|dropless   (strategy)
  --config.model.moe.top_k=1                       (Switch) / 2 (Mixtral)

Sizes:
- ``tiny``: a tiny top-2 MoE with 4 experts in every layer (tests, seconds on CPU).
- ``ablation``: the MoE ablation (``records/``): 8 experts in every layer, each as
  wide as the dense baseline's FFN, so top-1 has the dense model's *active*
  parameters per token (``dense`` is the same model with ``num_experts=0``).
- ``small``: 8 experts, top-2, every other layer, for one accelerator.

Balancing (``model.moe``): ``load_balance_coef`` (Switch, 0.01), ``z_loss_coef``
(ST-MoE, 1e-3), ``bias_update_rate`` (auxiliary-loss-free, DeepSeek-V3: 1e-3).
"""
from experiments.configs import base, unknown_arg

SIZES = {
    # base size, experts, top_k, every, expert d_ff (0: model.d_ff)
    "tiny": ("tiny", 4, 2, 1, 0),
    "ablation": ("tiny", 8, 1, 1, 0),
    "small": ("small", 8, 2, 2, 0),
}


def get_config(size: str = "tiny"):
  if size not in SIZES:
    raise unknown_arg("moe.py", size, SIZES)
  base_size, experts, top_k, every, d_ff = SIZES[size]
  c = base.get_config(base_size)
  c.name = f"moe-{size}"
  c.model.moe.num_experts = experts
  c.model.moe.top_k = top_k
  c.model.moe.every = every
  c.model.moe.d_ff = d_ff
  if size == "ablation":
    c.model.update(dict(d_model=96, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256))
    c.data.seq_len, c.data.batch_size = 128, 16
    c.train.steps = 300
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 10, 50, 300
    c.train.eval_batches = 8
    c.optimizer.learning_rate = 3e-3
    c.model.moe.dispatch = "dropping"  # Switch's setting: capacity 1.25, drops measured
  return c
