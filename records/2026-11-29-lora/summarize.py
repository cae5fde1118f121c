"""Tables for the fine-tuning records from ``run.py``'s results.

  python records/2026-11-29-lora/summarize.py --lora=/tmp/finetune --dpo=/tmp/finetune_dpo

Writes ``results.json`` and ``tables.md`` into records/2026-11-29-lora and -dpo (each
README quotes its tables and gives the verdicts), and copies every run's
``metrics.jsonl`` into ``<record>/runs/<name>/``.
"""
import argparse
import json
import os
import shutil
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDS = os.path.dirname(HERE)
LORA_VARIANTS = [("base", "base (no fine-tuning)"), ("r4", "LoRA r=4"), ("r16", "LoRA r=16"),
                 ("r64", "LoRA r=64"), ("qlora_r16", "QLoRA r=16 (nf4 base, g64)"),
                 ("r16_lr1e-2", "LoRA r=16, lr 1e-2"), ("full", "full fine-tuning")]


def cell(values, digits=3):
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def seeds(data, prefix):
  return sorted({k.split("/")[1] for k in data if k.startswith(prefix)})


def lora_table(data):
  ss = seeds(data, "lora/")
  lines = [f"Bases {', '.join(ss)} (one seed each; mean ± sd over them). Eval loss in nats "
           "per token on 16 held-out batches.", "",
           "| variant | trained parameters | optimizer state MB | checkpoint MB | eval loss, "
           "code (new domain) | vs base | eval loss, docs (base's domain) | vs base |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for v, label in LORA_VARIANTS:
    have = [s for s in ss if f"lora/{s}/{v}/code" in data]
    if not have:
      continue
    get = lambda s, what: data[f"lora/{s}/{v}/{what}"]["eval_loss"]
    base = lambda s, what: data[f"lora/{s}/base/{what}"]["eval_loss"]
    cost = data.get(f"lora/{have[0]}/{v}/cost", {})
    mb = lambda k: f"{cost[k] / 1e6:.2f}" if k in cost else "-"
    lines.append(
        f"| {label} | {cost.get('trainable', 0):,} | {mb('opt_bytes')} | {mb('ckpt_bytes')} | "
        f"{cell([get(s, 'code') for s in have])} | "
        f"{cell([get(s, 'code') - base(s, 'code') for s in have])} | "
        f"{cell([get(s, 'docs') for s in have])} | "
        f"{cell([get(s, 'docs') - base(s, 'docs') for s in have])} |")
  return lines


def dpo_table(data):
  ss = seeds(data, "dpo/")
  lines = [f"Bases {', '.join(ss)} (mean ± sd). Held-out pairs (16 batches of 8 pairs), "
           "after 100 steps; `before` is the base (policy = reference).", ""]
  keys = [("eval_dpo/reward_accuracy", "reward accuracy"), ("eval_dpo/margin", "margin"),
          ("eval_dpo/kl", "KL(policy ‖ ref) per token"),
          ("eval_dpo/policy_accuracy", "policy prefers chosen"),
          ("eval_dpo/chosen_reward", "chosen reward"),
          ("eval_dpo/rejected_reward", "rejected reward")]
  for task in ("upper", "reverse"):
    have = [s for s in ss if f"dpo/{s}/{task}/before" in data]
    if not have:
      continue
    lines += [f"**synthetic:{task}**", "",
              "| run | " + " | ".join(k[1] for k in keys) + " |",
              "| --- |" + " ---: |" * len(keys)]
    rows = [("before (the base)", lambda s: data[f"dpo/{s}/{task}/before"])]
    for mode, name in (("dpo", "LoRA r=16"), ("dpo-full", "full")):
      for beta in ("0.1", "0.5"):
        key = lambda s, mode=mode, beta=beta: data.get(f"dpo/{s}/{task}/{mode}/b{beta}/after")
        rows.append((f"{name}, beta {beta}", key))
    for label, get in rows:
      got = [get(s) for s in have if get(s)]
      if not got:
        continue
      lines.append(f"| {label} | " + " | ".join(cell([g[k] for g in got], 2)
                                                for k, _ in keys) + " |")
    lines.append("")
  return lines


def write(record, data, lines, runs_dir):
  folder = os.path.join(RECORDS, record)
  with open(os.path.join(folder, "results.json"), "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  with open(os.path.join(folder, "tables.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  for name in sorted(os.listdir(runs_dir)):
    src = os.path.join(runs_dir, name, "metrics.jsonl")
    if os.path.exists(src):
      os.makedirs(os.path.join(folder, "runs", name), exist_ok=True)
      shutil.copyfile(src, os.path.join(folder, "runs", name, "metrics.jsonl"))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lora", required=True)
  ap.add_argument("--dpo", required=True)
  args = ap.parse_args()
  for work, record, table in ((args.lora, "2026-11-29-lora", lora_table),
                              (args.dpo, "2026-11-29-dpo", dpo_table)):
    with open(os.path.join(work, "results.json")) as f:
      data = json.load(f)
    data = {k: v for k, v in data.items() if k.startswith(("lora/", "dpo/"))}
    lines = table(data)
    write(record, data, lines, os.path.join(work, "runs"))
    print("\n".join(lines))


if __name__ == "__main__":
  main()
