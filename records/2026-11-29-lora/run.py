"""Runs for the fine-tuning records (LoRA / QLoRA, and DPO), resumable.

  python records/2026-11-29-lora/run.py --work=/tmp/finetune --seeds=0,1 \
      [--bases=/tmp/compression/runs] [--phases=lora,dpo]

Bases: the compression records' dense models ``D<s>`` (``base.py:default`` at d_model
128, 4 layers, 1.84M parameters, 300 steps on the shipped ``python_docs`` corpus with
the shipped BPE; ``records/2026-11-29-quantization/run.py``), trained here when
``--bases`` does not hold them.

- ``lora``: from ``D<s>``, 150 steps on the held-out domain (the shipped ``python_code``
  corpus), batch 16 x 128: LoRA ranks 4 / 16 / 64 (alpha = 2 x rank, learning rate
  2e-3, every attention and MLP matrix), QLoRA (nf4 base, group 64, rank 16), rank 16 at
  learning rate 1e-2 (LoRA is often run at a higher rate than full fine-tuning) and
  full fine-tuning (learning rate 1e-3), AdamW without weight decay, cosine; each evaluated
  on 16 held-out batches of code (the new domain) and of docs (what the base knew),
  with its trainable parameters, optimizer-state and checkpoint bytes.
- ``dpo``: from ``D<s>``, 100 steps of DPO (sigmoid loss) on the shipped synthetic
  preference tasks ``synthetic:upper`` and ``synthetic:reverse`` (batch 16 = 8 pairs),
  full (learning rate 1e-4, the reference a frozen copy of the base) and LoRA (rank 16,
  learning rate 1e-3, the reference the base with the adapters off), beta 0.1 and 0.5;
  reward accuracy, margin and KL(policy || reference) on 16 held-out batches before
  (the base: accuracy 0, margin 0, KL 0 by construction) and after.
"""
import argparse
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)


def _quantization_runner():
  path = os.path.join(ROOT, "records", "2026-11-29-quantization", "run.py")
  spec = importlib.util.spec_from_file_location("quantization_run", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


Q = _quantization_runner()
EVAL = 16
LORA = {"r4": {"lora.rank": 4, "lora.alpha": 8.0},
        "r16": {"lora.rank": 16, "lora.alpha": 32.0},
        "r64": {"lora.rank": 64, "lora.alpha": 128.0},
        "qlora_r16": {"lora.rank": 16, "lora.alpha": 32.0, "lora.base_quant": "nf4",
                      "lora.base_group_size": 64}}
TEXT = {"train.steps": 150, "train.eval_every": 150, "train.checkpoint_every": 150,
        "train.log_every": 10, "train.eval_batches": EVAL}
DPO = {"train.steps": 100, "train.eval_every": 100, "train.checkpoint_every": 100,
       "train.log_every": 10, "train.eval_batches": EVAL, "data.batch_size": 16}
TASKS = ("synthetic:upper", "synthetic:reverse")
BETAS = (0.1, 0.5)


def finetune(base: str, mode: str, workdir: str, fields: dict) -> dict:
  from experiments import configs
  from lm import loop
  config = configs.override(configs.load(os.path.join(ROOT, f"experiments/configs/finetune.py:"
                                                      f"{base},{mode}")),
                            {"train.progress": "log", "train.plot": False,
                             "train.tensorboard": False, **fields})
  summary = loop.run(config, workdir)
  from lm.lora import tree_bytes
  return {"trainable": int(summary["trained_params"]),
          "opt_bytes": tree_bytes(summary["state"]["opt_state"]),
          "ckpt_bytes": _folder_bytes(os.path.join(workdir, "checkpoints"))}


def _folder_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def evaluate(workdir: str, overrides: dict) -> dict:
  from experiments import evaluate as ev
  r = ev.evaluate(workdir, overrides, EVAL)
  return {k: v for k, v in r.items() if k in ("eval_loss", "eval_bpb") or k.startswith("eval_dpo/")}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--work", required=True)
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--bases", default="")
  ap.add_argument("--phases", default="lora,dpo")
  args = ap.parse_args()
  os.chdir(ROOT)
  runs = os.path.join(args.work, "runs")
  os.makedirs(runs, exist_ok=True)
  res = Q.Results(os.path.join(args.work, "results.json"))
  run = lambda name: os.path.join(runs, name)
  code, docs = {"data.path": "python_code"}, {"data.path": ""}
  for s in [int(x) for x in args.seeds.split(",")]:
    base = os.path.join(args.bases, f"D{s}") if args.bases else run(f"D{s}")
    if not os.path.isdir(os.path.join(base, "checkpoints")):
      Q.train(base, {**Q.SMALL, "seed": s})
    seed = {"seed": s}
    if "lora" in args.phases:
      res.get(f"lora/D{s}/base/code", lambda: evaluate(base, code))
      res.get(f"lora/D{s}/base/docs", lambda: evaluate(base, docs))
      variants = [(name, "lora", {**over, "lora.targets": ("attention", "mlp"),
                                  "optimizer.learning_rate": 2e-3})
                  for name, over in LORA.items()]
      variants.append(("r16_lr1e-2", "lora", {**LORA["r16"], "lora.targets": ("attention", "mlp"),
                                              "optimizer.learning_rate": 1e-2}))
      variants.append(("full", "full", {"optimizer.learning_rate": 1e-3}))
      for name, mode, over in variants:
        work = run(f"D{s}_{name}")
        res.get(f"lora/D{s}/{name}/cost", lambda: finetune(base, mode, work, {**TEXT, **seed,
                                                                           **over}))
        res.get(f"lora/D{s}/{name}/code", lambda: evaluate(work, code))
        res.get(f"lora/D{s}/{name}/docs", lambda: evaluate(work, docs))
    if "dpo" in args.phases:
      for task in TASKS:
        t = task.split(":")[1]
        pref = {"data.source": "preference", "data.path": task, "data.batch_size": 16,
                "dpo.loss": "sigmoid"}
        res.get(f"dpo/D{s}/{t}/before", lambda: evaluate_dpo_before(base, pref))
        for mode, lr in (("dpo", 1e-3), ("dpo-full", 1e-4)):
          for beta in BETAS:
            work = run(f"D{s}_{t}_{mode}_b{beta}")
            res.get(f"dpo/D{s}/{t}/{mode}/b{beta}/cost", lambda: finetune(
                base, mode, work, {**DPO, **seed, "data.path": task, "dpo.beta": beta,
                                   "optimizer.learning_rate": lr}))
            res.get(f"dpo/D{s}/{t}/{mode}/b{beta}/after",
                    lambda: _last_eval(os.path.join(work, "metrics.jsonl")))


def evaluate_dpo_before(base: str, pref: dict) -> dict:
  """The held-out preference metrics of the base itself: a 0-step DPO run's eval."""
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    finetune(base, "dpo-full", tmp, {**DPO, **pref, "train.steps": 1, "train.eval_every": 1,
                                     "optimizer.learning_rate": 1e-30,
                                     "optimizer.warmup_steps": 0})
    return _last_eval(os.path.join(tmp, "metrics.jsonl"))


def _last_eval(path: str) -> dict:
  with open(path) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  last = [r for r in recs if "eval_dpo/reward_accuracy" in r][-1]
  return {k: v for k, v in last.items() if k.startswith("eval_dpo/") or k == "eval_loss"}


if __name__ == "__main__":
  main()
