"""Tables for the three compression records from ``run.py``'s results.

  python records/2026-11-29-quantization/summarize.py --work=/tmp/compression

Writes ``results.json`` and ``tables.md`` into records/2026-11-29-quantization,
-pruning and -distillation (each README quotes its tables and gives the verdict), and
copies every run's ``metrics.jsonl`` into ``<record>/runs/<name>/``.
"""
import argparse
import json
import os
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
RECORDS = os.path.join(ROOT, "records")
FOLDERS = {"quant": "2026-11-29-quantization", "prune": "2026-11-29-pruning",
           "distill": "2026-11-29-distillation"}


def stats(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None, 0
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return statistics.mean(values), sd, len(values)


def cell(values, digits=4):
  m, sd, n = stats(values)
  return "-" if m is None else f"{m:.{digits}f} ± {sd:.{digits}f}"


def seeds_of(data, prefix):
  return sorted({k.split("/")[1][1:] for k in data if k.startswith(prefix)})


def quant_tables(data):
  lines = []
  variants = [("fp32", "fp32 compute"), ("bf16", "bf16 (as trained)"),
              ("int8", "int8 per channel (PTQ)"), ("w8a8", "int8 weights + int8 activations"),
              ("int4", "int4 per channel (PTQ)"), ("int4_g128", "int4 g128 (PTQ)"),
              ("ft_plain/bf16", "+60 plain steps, bf16"),
              ("ft_plain/int4_g128", "+60 plain steps, then int4 g128 PTQ"),
              ("ft_qat/bf16", "+60 QAT steps, fp master weights"),
              ("ft_qat/int4_g128", "+60 QAT steps, int4 g128")]
  summary = {}
  for m, name in (("D", "dense"), ("M", "MoE, 8 experts, top-2")):
    seeds = [s for s in seeds_of(data, f"quant/{m}") if f"quant/{m}{s}/ft_qat/int4_g128" in data]
    if not seeds:
      continue
    get = lambda s, v, key="eval_loss": data[f"quant/{m}{s}/{v}"][key]
    lines += [f"**{name}**, seeds {', '.join(seeds)} (mean ± sd)", "",
              "| weights | eval loss (nats) | vs bf16 | bits per byte | weight MB |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for v, label in variants:
      loss = [get(s, v) for s in seeds]
      delta = [get(s, v) - get(s, "bf16") for s in seeds]
      bpb = [get(s, v, "eval_bpb") for s in seeds]
      mb = get(seeds[0], v, "weight_bytes") / 1e6
      lines.append(f"| {label} | {cell(loss)} | {cell(delta)} | {cell(bpb)} | {mb:.2f} |")
    gap_ptq = [get(s, "ft_plain/int4_g128") - get(s, "ft_plain/bf16") for s in seeds]
    gap_qat = [get(s, "ft_qat/int4_g128") - get(s, "ft_plain/bf16") for s in seeds]
    recovered = [1 - q / p if p > 0 else None for p, q in zip(gap_ptq, gap_qat)]
    summary[m] = {"seeds": seeds,
                  "int8_delta": stats([get(s, "int8") - get(s, "bf16") for s in seeds])[:2],
                  "w8a8_delta": stats([get(s, "w8a8") - get(s, "bf16") for s in seeds])[:2],
                  "int4_g128_delta": stats([get(s, "int4_g128") - get(s, "bf16")
                                            for s in seeds])[:2],
                  "ptq_gap_after_60": stats(gap_ptq)[:2], "qat_gap_after_60": stats(gap_qat)[:2],
                  "qat_recovered_share": stats(recovered)[:2]}
    lines += ["", f"int4 g128 gap to the bf16 model after the same 60 extra steps: PTQ "
              f"{cell(gap_ptq)}, QAT {cell(gap_qat)}; share of the PTQ gap QAT recovers: "
              f"{cell(recovered, 2)}", ""]
  return lines, summary


def prune_tables(data):
  seeds = [s for s in seeds_of(data, "prune/D") if f"prune/D{s}/gradual90/gradual_ft" in data]
  if not seeds:
    return [], {}
  get = lambda s, k: data[f"prune/D{s}/{k}"]["eval_loss"]
  dense = [get(s, "dense") for s in seeds]
  plain = [data.get(f"quant/D{s}/ft_plain/bf16", {}).get("eval_loss") for s in seeds]
  lines = [f"Dense model of the quantization record, seeds {', '.join(seeds)} (mean ± sd "
           "eval loss in nats; in brackets: minus the unpruned model's)", "",
           "| sparsity | one-shot, no fine-tuning | one-shot + 60 steps | gradual over 60 steps |",
           "| --- | ---: | ---: | ---: |",
           f"| 0 % (unpruned; +60 plain steps) | {cell(dense)} | {cell(plain)} | - |"]
  summary = {"seeds": seeds, "dense": stats(dense)[:2], "plain_ft": stats(plain)[:2]}
  for p, label in (("mag50", "50 % magnitude"), ("mag70", "70 % magnitude"),
                   ("mag90", "90 % magnitude"), ("2:4", "2:4 (50 %)")):
    one = [get(s, f"{p}/oneshot") for s in seeds]
    ft = [get(s, f"{p}/oneshot_ft") for s in seeds]
    g = p.replace("mag", "gradual")
    grad = [get(s, f"{g}/gradual_ft") for s in seeds] if f"prune/D{seeds[0]}/{g}/gradual_ft" \
        in data else None
    d = lambda xs: cell([x - y for x, y in zip(xs, dense)], 3)
    lines.append(f"| {label} | {cell(one)} ({d(one)}) | {cell(ft)} ({d(ft)}) | "
                 + (f"{cell(grad)} ({d(grad)})" if grad else "-") + " |")
    summary[p] = {"oneshot": stats(one)[:2], "oneshot_ft": stats(ft)[:2],
                  "gradual_ft": stats(grad)[:2] if grad else None}
  return lines, summary


def distill_tables(data):
  seeds = [s for s in seeds_of(data, "distill/S") if f"distill/D{s}" in data]
  if not seeds or "distill/teacher" not in data:
    return [], {}
  scratch = [data[f"distill/D{s}"]["eval_loss"] for s in seeds]
  distilled = [data[f"distill/S{s}"]["eval_loss"] for s in seeds]
  diff = [a - b for a, b in zip(distilled, scratch)]
  t = data["distill/teacher"]
  lines = [f"Students: 1.84M parameters (0.79M outside the embedding and head), 300 steps, "
           f"seeds {', '.join(seeds)}; teacher: 5.24M (3.15M outside them: 4.0x), 300 steps",
           "",
           "| model | eval loss (nats) | bits per byte |", "| --- | ---: | ---: |",
           f"| teacher (d_model 256, seed 0) | {t['eval_loss']:.4f} | {t['eval_bpb']:.4f} |",
           f"| student from scratch | {cell(scratch)} | "
           f"{cell([data[f'distill/D{s}']['eval_bpb'] for s in seeds])} |",
           f"| student distilled (kl + ce) | {cell(distilled)} | "
           f"{cell([data[f'distill/S{s}']['eval_bpb'] for s in seeds])} |",
           "", f"distilled minus scratch, paired by seed: {cell(diff)} nats"]
  return lines, {"seeds": seeds, "teacher": t["eval_loss"], "scratch": stats(scratch)[:2],
                 "distilled": stats(distilled)[:2], "difference": stats(diff)[:2]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--work", required=True)
  args = ap.parse_args()
  with open(os.path.join(args.work, "results.json")) as f:
    data = json.load(f)
  from experiments.record import environment
  env = environment()
  for key, fn in (("quant", quant_tables), ("prune", prune_tables), ("distill", distill_tables)):
    lines, summary = fn(data)
    out = os.path.join(RECORDS, FOLDERS[key])
    os.makedirs(out, exist_ok=True)
    header = [f"Generated by summarize.py on {env['date']} at commit {env['commit']} "
              f"({env['hardware']}).", ""]
    with open(os.path.join(out, "tables.md"), "w") as f:
      f.write("\n".join(header + lines) + "\n")
    raw = {k: v for k, v in data.items() if k.startswith(key + "/")
           or (key == "prune" and k.startswith("quant/D") and "ft_plain/bf16" in k)
           or (key == "distill" and k.startswith("quant/D") and k.endswith("/bf16"))}
    with open(os.path.join(out, "results.json"), "w") as f:
      json.dump({"environment": env, "summary": summary, "evaluations": raw}, f, indent=1)
    print("\n".join(lines))
  runs = os.path.join(args.work, "runs")
  for name in sorted(os.listdir(runs)):
    key = ("distill" if name[0] in "ST" else "prune" if "_" in name and "_ft_" not in name
           else "quant")
    src = os.path.join(runs, name, "metrics.jsonl")
    if os.path.exists(src):
      dst = os.path.join(RECORDS, FOLDERS[key], "runs", name)
      os.makedirs(dst, exist_ok=True)
      shutil.copyfile(src, os.path.join(dst, "metrics.jsonl"))


if __name__ == "__main__":
  main()
