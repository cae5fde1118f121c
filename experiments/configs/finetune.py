"""Fine-tuning a trained run: LoRA / QLoRA adapters or all weights, on new text or on
preference pairs (DPO).

  --config=experiments/configs/finetune.py:<base workdir>[,<mode>]

The base run's own config (its model, tokenizer, mesh) is the start; then:

- ``lora`` (default): rank-16 adapters on every attention / MLP / expert / linear
  projection (``lm/lora.py``), the base frozen: ``--config.lora.rank``, ``.alpha``,
  ``.targets``; ``--config.lora.base_quant=nf4`` (or int4) is QLoRA;
- ``full``: every weight trains from the base (``train.init_from``);
- ``dpo`` / ``dpo-full``: DPO (``lm/losses/dpo.py``) on the shipped synthetic preference
  task (``data.path=synthetic:reverse``; a JSONL of prompt / chosen / rejected rows
  instead with ``--config.data.path``), with adapters (the reference is the base with
  the adapters off) or all weights (the reference is a frozen copy of the base).

The text fine-tunes train on the shipped ``python_code`` corpus (a held-out domain for a
base trained on the default ``python_docs``); ``--config.data.*`` picks other data.
AdamW throughout; run ``python -m experiments.export --workdir=<this run> --out=M`` to
merge adapters into a plain run.
"""

from core.errors import ConfigError
from experiments.configs import unknown_arg

MODES = ("lora", "full", "dpo", "dpo-full")


def get_config(arg: str = ""):
  workdir, _, mode = arg.partition(",")
  mode = mode or "lora"
  if mode not in MODES:
    raise unknown_arg("finetune.py", f"{workdir},{mode}", [f"<workdir>,{m}" for m in MODES])
  if not workdir:
    raise ConfigError("--config", "experiments/configs/finetune.py", "needs the base run",
                      "pass --config=experiments/configs/finetune.py:<base workdir>[,mode]")
  from lm.config import load_run_config
  c = load_run_config(workdir, flag="--config (finetune.py:<base workdir>)")
  c.name = f"finetune-{mode}"
  if mode in ("lora", "dpo"):
    c.lora.init_from = workdir
    c.lora.rank, c.lora.alpha = 16, 32.0
  else:
    c.train.init_from = workdir
  c.optimizer.name = "adamw"
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 0.0
  c.train.steps = 200
  if mode.startswith("dpo"):
    c.data.source, c.data.path = "preference", "synthetic:reverse"
    c.data.batch_size = max(2, c.data.batch_size - c.data.batch_size % 2)
    c.dpo.loss, c.dpo.beta = "sigmoid", 0.1
    c.optimizer.learning_rate = 1e-3 if mode == "dpo" else 1e-4
  else:
    c.data.source, c.data.path = "embedded", "python_code"
    c.optimizer.learning_rate = 2e-3 if mode == "lora" else 3e-4
  c.optimizer.warmup_steps = c.train.get_ref("steps") // 20
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.checkpoint_every = 100
  return c
