"""The record's tables from every subfolder's runs: python records/2026-11-29-mqar-recall/tables.py

Groups runs by task (length, pairs, spread, steps), model and learning rate and prints
Markdown: final eval loss / accuracy (mean ± std over seeds, population std), the first
eval step at which accuracy reached 0.9 and 0.99 per seed, and for runs evaluated at
other lengths (``eval_seq<L>.json``) the accuracy and exact match per length.
"""
import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def label(c):
  m = c["model"]
  name = m["layer_pattern"]
  if "L" in name:
    name += "/" + m["linear"]["variant"]
  if m.get("qkv_conv"):
    name += f"+conv{m['qkv_conv']}"
  return name


def runs():
  for d in sorted(glob.glob(os.path.join(HERE, "*", "runs", "*"))):
    if not os.path.exists(os.path.join(d, "summary.json")):
      continue
    c = json.load(open(os.path.join(d, "config.json")))
    rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    evals = [r for r in rows if "eval_accuracy" in r]
    s = c["data"]["synthetic"]
    task = (c["data"]["seq_len"], s["num_pairs"], s["spread"], c["train"]["steps"])
    lengths = {}
    for f in glob.glob(os.path.join(d, "eval_seq*.json")):
      e = json.load(open(f))
      acc = e.get("eval_accuracy", e.get("token_accuracy"))
      lengths[int(os.path.basename(f)[len("eval_seq"):-len(".json")])] = (acc, e["exact_match"])
    yield {"task": task, "model": label(c), "lr": c["optimizer"]["learning_rate"],
           "seed": c["seed"], "loss": evals[-1]["eval_loss"], "acc": evals[-1]["eval_accuracy"],
           "curve": [(r["step"], r["eval_accuracy"]) for r in evals], "lengths": lengths,
           "dir": os.path.relpath(d, HERE)}


def ms(xs):
  return f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}"


def first(curve, x):
  return next((str(s) for s, a in curve if a >= x), "-")


def main():
  groups = {}
  for r in runs():  # a seed run twice (lr-sweep-64 and softmax-64) counts once
    group = groups.setdefault((r["task"], r["model"], r["lr"]), [])
    if r["seed"] not in [g["seed"] for g in group]:
      group.append(r)
  print("| task | model | lr | seeds | eval loss | eval accuracy | step acc >= 0.9 | "
        "step acc >= 0.99 |")
  print("| --- | --- | ---: | --- | ---: | ---: | --- | --- |")
  for (task, model, lr), rs in sorted(groups.items()):
    rs.sort(key=lambda r: r["seed"])
    T, pairs, spread, steps = task
    name = f"{T}/{pairs}{' spread' if spread else ''}, {steps} steps"
    print(f"| {name} | {model} | {lr:g} | {','.join(str(r['seed']) for r in rs)} | "
          f"{ms([r['loss'] for r in rs])} | {ms([r['acc'] for r in rs])} | "
          f"{', '.join(first(r['curve'], 0.9) for r in rs)} | "
          f"{', '.join(first(r['curve'], 0.99) for r in rs)} |")
  print()
  lengths = sorted({L for rs in groups.values() for r in rs for L in r["lengths"]})
  print(f"| model | lr | steps | seeds | {' | '.join(f'accuracy at {L}' for L in lengths)} | "
        f"exact match {' / '.join(map(str, lengths))} |")
  print(f"| --- | ---: | ---: | --- | {' | '.join('---:' for _ in lengths)} | --- |")
  for (task, model, lr), rs in sorted(groups.items()):
    rs = sorted((r for r in rs if r["lengths"]), key=lambda r: r["seed"])
    if not rs:
      continue
    pick = lambda L, i: [r["lengths"][L][i] for r in rs if L in r["lengths"]]
    accs = [ms(pick(L, 0)) if pick(L, 0) else "-" for L in lengths]
    exact = " / ".join(ms(pick(L, 1)) if pick(L, 1) else "-" for L in lengths)
    print(f"| {model} | {lr:g} | {task[3]} | {','.join(str(r['seed']) for r in rs)} | "
          f"{' | '.join(accs)} | {exact} |")


if __name__ == "__main__":
  main()
