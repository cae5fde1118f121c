"""Runs for the compression records (quantization, pruning, distillation), resumable.

  python records/2026-11-29-quantization/run.py --work=/tmp/compression --seeds=0,1,2 \
      [--phases=train,quant,prune,distill]

Everything is on the shipped corpus with the shipped BPE (bits per byte on held-out
text), at one small size on a 2-core CPU:

- dense ``D<s>``: ``base.py:default`` with d_model 128, 4 layers, 2 heads (head_dim
  64), d_ff 384, 300 steps (every input dimension is a multiple of 128, so int4 uses
  the published group of 128); MoE ``M<s>``: the same with 8 experts of d_ff 256, top-2
  (512 active FFN width; 192 would match the dense 384 but is no multiple of 128);
- quantization: each trained model evaluated fp32, bf16 (as trained), int8 per channel,
  int8 w8a8, int4 per channel, int4 g128 (PTQ, ``--config.quant.*`` on read-back); then
  60 more steps from it two ways: QAT int4 g128 (``quant.mode=qat``) and plain (the
  control for the extra training), each evaluated int4 g128;
- pruning (of ``D<s>``): magnitude 50/70/90 % and 2:4 one-shot (``experiments.prune``)
  without fine-tuning and with 60 steps of fine-tuning under the masks, and gradual
  (Zhu & Gupta's cubic ramp over 40 of the 60 steps) to 70 and 90 %;
- distillation: one teacher ``T`` (d_model 256, d_ff 768, 4 heads: ~4x the student's
  non-embedding parameters), 300 steps; students of ``D``'s shape distilled for 300
  steps (``distill.loss=kl+ce``) against ``D<s>`` itself (trained from scratch, equal
  steps).

Every evaluation reads 16 held-out batches (32k tokens), the same for every variant.
``summarize.py`` in each record folder writes its README table from ``<work>/results``.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

BASE = "experiments/configs/base.py:default"
SMALL = {"model.d_model": 128, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 384,
         "train.steps": 300}
MOE = {"model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.d_ff": 256}
TEACHER = {"model.d_model": 256, "model.n_heads": 4, "model.n_kv_heads": 2,
           "model.d_ff": 768, "train.steps": 300}
FINETUNE = {"train.steps": 60, "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 0,
            "train.eval_every": 60, "train.checkpoint_every": 60}
EVAL_BATCHES = 16
QUANT = {"fp32": {"model.dtype": "float32"}, "bf16": {},
         "int8": {"quant.weight": "int8"},
         "w8a8": {"quant.weight": "int8", "quant.act": "int8"},
         "int4": {"quant.weight": "int4"},
         "int4_g128": {"quant.weight": "int4", "quant.group_size": 128}}
INT4 = {"quant.weight": "int4", "quant.group_size": 128}
PRUNE = {"mag50": {"prune.method": "magnitude", "prune.sparsity": 0.5},
         "mag70": {"prune.method": "magnitude", "prune.sparsity": 0.7},
         "mag90": {"prune.method": "magnitude", "prune.sparsity": 0.9},
         "2:4": {"prune.method": "nm"}}
GRADUAL = {"gradual70": {"prune.method": "magnitude", "prune.sparsity": 0.7},
           "gradual90": {"prune.method": "magnitude", "prune.sparsity": 0.9}}
RAMP = {"prune.schedule": "gradual", "prune.begin": 0, "prune.end": 40, "prune.every": 5}


def train(workdir: str, fields: dict) -> None:
  from experiments import configs
  from lm import loop
  config = configs.override(configs.load(os.path.join(ROOT, BASE)), {
      "train.progress": "log", "train.plot": False, "train.tensorboard": False, **fields})
  loop.run(config, workdir)


def evaluate(workdir: str, overrides: dict | None = None) -> dict:
  from experiments import evaluate as ev
  r = ev.evaluate(workdir, overrides or {}, EVAL_BATCHES)
  return {k: r[k] for k in ("step", "eval_loss", "eval_bpb", "weight_bytes", "sparsity")}


class Results:
  def __init__(self, path):
    self.path = path
    self.data = json.load(open(path)) if os.path.exists(path) else {}

  def get(self, key, fn):
    if key not in self.data:
      self.data[key] = fn()
      with open(self.path + ".tmp", "w") as f:
        json.dump(self.data, f, indent=1)
      os.replace(self.path + ".tmp", self.path)
      print(key, self.data[key], flush=True)
    return self.data[key]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--work", required=True)
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--phases", default="train,quant,prune,distill")
  args = ap.parse_args()
  os.chdir(ROOT)
  runs = os.path.join(args.work, "runs")
  os.makedirs(runs, exist_ok=True)
  res = Results(os.path.join(args.work, "results.json"))
  seeds = [int(s) for s in args.seeds.split(",")]
  phases = args.phases.split(",")
  run = lambda name: os.path.join(runs, name)
  done = lambda name: os.path.isdir(os.path.join(run(name), "checkpoints"))

  def trained(name, fields):
    if not os.path.exists(os.path.join(run(name), "metrics.jsonl")) or not _finished(run(name)):
      train(run(name), fields)
    return run(name)

  for s in seeds:
    seed = {"seed": s}
    if "train" in phases:
      trained(f"D{s}", {**SMALL, **seed})
      trained(f"M{s}", {**SMALL, **MOE, **seed})
    if "quant" in phases:
      for m, extra in (("D", {}), ("M", MOE)):
        for q, over in QUANT.items():
          res.get(f"quant/{m}{s}/{q}", lambda: evaluate(run(f"{m}{s}"), over))
        for how, fields in (("qat", {"quant.mode": "qat", **INT4}), ("plain", {})):
          name = f"{m}{s}_ft_{how}"
          trained(name, {**SMALL, **extra, **seed, **FINETUNE, "train.init_from": run(f"{m}{s}"),
                         **fields})
          res.get(f"quant/{m}{s}/ft_{how}/int4_g128", lambda: evaluate(run(name), INT4))
          res.get(f"quant/{m}{s}/ft_{how}/bf16",
                  lambda: evaluate(run(name), {"quant.weight": "none", "quant.mode": "ptq"}))
    if "prune" in phases:
      from experiments import prune as prune_cli
      res.get(f"prune/D{s}/dense", lambda: evaluate(run(f"D{s}")))
      for p, over in PRUNE.items():
        pruned = run(f"D{s}_{p.replace(':', '-')}")
        if not done(os.path.basename(pruned)):
          prune_cli.prune(run(f"D{s}"), pruned, over)
        res.get(f"prune/D{s}/{p}/oneshot", lambda: evaluate(pruned))
        name = f"D{s}_{p.replace(':', '-')}_ft"
        trained(name, {**SMALL, **seed, **FINETUNE, "train.init_from": pruned, **over})
        res.get(f"prune/D{s}/{p}/oneshot_ft", lambda: evaluate(run(name)))
      for p, over in GRADUAL.items():
        name = f"D{s}_{p}"
        trained(name, {**SMALL, **seed, **FINETUNE, "train.init_from": run(f"D{s}"), **over,
                       **RAMP})
        res.get(f"prune/D{s}/{p}/gradual_ft", lambda: evaluate(run(name)))
    if "distill" in phases:
      teacher = trained("T", {**TEACHER, "seed": 0})
      res.get("distill/teacher", lambda: evaluate(teacher))
      name = f"S{s}"
      trained(name, {**SMALL, **seed, "distill.teacher": teacher, "distill.loss": "kl+ce",
                     "distill.ce_weight": 1.0})
      res.get(f"distill/{name}", lambda: evaluate(run(name)))
      res.get(f"distill/D{s}", lambda: evaluate(run(f"D{s}")))


def _finished(workdir: str) -> bool:
  with open(os.path.join(workdir, "config.json")) as f:
    steps = json.load(f)["train"]["steps"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return any(json.loads(line).get("step") == steps and "eval_loss" in json.loads(line)
               for line in f if line.strip())


if __name__ == "__main__":
  main()
