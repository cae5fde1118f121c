"""Two shipped sources, mixed: CPython's docstrings (prose) and its code (``lm/data/corpus``).

Usage: ``--config=experiments/configs/mixture.py:<variant>[,<base.py size>]`` with variant
``docs`` (prose only: the baseline), ``mix`` (half prose, half code all along) or
``curriculum`` (prose only for the first half of training, then half and half). Every
variant logs ``eval_loss/<name>`` and ``eval_bpb/<name>`` for both sources, so the effect
of the code on the prose, and of the order, is measured on the same held-out text.
The model and budget are base.py's (``default`` unless a size follows the variant); the
tokenizer is the shipped BPE.

To mix your own data, copy this file and point each entry of ``data.mixture`` at a
source: ``{"source": "jsonl", "path": "shards/*.jsonl", "field": "text", "weight": 0.3}``.
"""
import ml_collections

from experiments.configs import unknown_arg
from experiments.configs.base import SIZES
from experiments.configs.base import get_config as base_config

VARIANTS = ("docs", "mix", "curriculum")


def get_config(arg: str = "mix") -> ml_collections.ConfigDict:
  variant, _, size = arg.partition(",")
  if variant not in VARIANTS:
    raise unknown_arg("mixture.py", arg, VARIANTS)
  if size and size not in SIZES:
    raise unknown_arg("mixture.py", arg, [f"{variant},{s}" for s in SIZES])
  c = base_config(size or "default")
  c.name = f"mixture-{variant}"
  c.data.source = "mixture"
  c.data.tokenizer = "bpe"
  c.data.mixture.docs = ml_collections.ConfigDict(
      {"source": "embedded", "path": "python_docs", "weight": 1.0})
  c.data.mixture.code = ml_collections.ConfigDict(
      {"source": "embedded", "path": "python_code", "weight": 1.0})
  if variant == "docs":
    c.data.stages = ((0, {"docs": 1.0}),)
  elif variant == "curriculum":
    c.data.stages = ((0, {"docs": 1.0}), (c.train.steps // 2, {"docs": 1.0, "code": 1.0}))
  return c
