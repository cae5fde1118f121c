"""Tables of records/2026-11-29-speculative/results.json (README.md holds its output).

  python records/2026-11-29-speculative/summarize.py
"""
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def expected_tokens(alpha: float, gamma: int) -> float:
  """Leviathan et al.: (1 - alpha^(gamma + 1)) / (1 - alpha) tokens per target call."""
  return gamma + 1.0 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def main():
  data = json.load(open(os.path.join(HERE, "results.json")))
  rows = [r for r in data["rows"] if r["target"] in ("plain", "early-exit-2")]  # seed 0, bf16
  print("| target | draft | gamma | alpha | tokens / target call (formula) | round cost "
        "(plain steps) | speed-up | output = plain greedy |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
  for r in rows:
    if r["setting"] != "greedy":
      continue
    print(f"| {r['target']} | {r['draft']} | {r['gamma']} | {r['alpha']:.3f} | "
          f"{r['tokens_per_target_call']:.2f} ({expected_tokens(r['alpha'], r['gamma']):.2f}) | "
          f"{r['round_cost']:.2f} | {r['speedup']:.2f}x | {r['equal_to_plain']} |")
  print()
  print("| target | draft | gamma | alpha (3 seeds) | tokens / target call | speed-up |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  groups = {}
  for r in rows:
    if r["setting"] == "greedy":
      continue
    groups.setdefault((r["target"], r["draft"], r["gamma"]), []).append(r)
  for (target, draft, gamma), rs in groups.items():
    ms = lambda k: (statistics.mean(x[k] for x in rs),
                    statistics.stdev(x[k] for x in rs) if len(rs) > 1 else 0.0)
    (a, da), (t, dt), (s, ds) = ms("alpha"), ms("tokens_per_target_call"), ms("speedup")
    print(f"| {target} | {draft} | {gamma} | {a:.3f} ± {da:.3f} | {t:.2f} ± {dt:.2f} | "
          f"{s:.2f}x ± {ds:.2f} |")


if __name__ == "__main__":
  main()
