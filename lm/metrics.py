"""Metrics out of the loop: metrics.jsonl, TensorBoard events, a progress bar or log lines.

``summarize`` turns the step metrics of one logging interval (nested dicts of
arrays, from ``lm.step``) into one flat record: every leaf averaged over the
steps, keys joined with ``/`` (``moe/block_0/load``), and for every group of
per-block statistics the mean of each scalar over the blocks (``moe/dropped``).
"""
import json
import math
import os
import sys

import numpy as np
from tqdm import tqdm


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def rounded(record: dict, digits: int = 5) -> dict:
  """``record`` with its vector entries rounded (shorter logs)."""
  return {k: [round(x, digits) for x in v] if isinstance(v, list) else v
          for k, v in record.items()}


def summarize(host_metrics: list[dict]) -> dict:
  """The mean of every leaf over ``host_metrics`` (lists of floats for vectors),
  flattened, plus per-group means over blocks (see the module docstring)."""
  flat = [_flatten(m) for m in host_metrics]
  record = {}
  for key in flat[0]:
    mean = np.mean([np.asarray(f[key], np.float64) for f in flat], axis=0)
    record[key] = float(mean) if mean.ndim == 0 else [float(x) for x in mean]
  groups: dict[str, dict[str, list]] = {}
  for key, value in record.items():
    parts = key.split("/")
    if len(parts) == 3 and parts[1].startswith("block_") and isinstance(value, float):
      groups.setdefault(f"{parts[0]}/{parts[2]}", []).append(value)
  record.update({k: float(np.mean(v)) for k, v in groups.items()})
  return record


class MetricsLogger:
  """Writes each record to ``metrics.jsonl`` and TensorBoard and shows progress.

  ``progress``: 'bar' (tqdm), 'log' (plain lines), or 'auto' (bar on a terminal);
  ``tensorboard``: also write TensorBoard events into ``<workdir>/tensorboard``.
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               progress: str = "auto", enabled: bool = True, tensorboard: bool = True):
    self.workdir, self.enabled = workdir, enabled
    if not enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    # On resume, drop records past the restored step (a run killed after its
    # last checkpoint logged steps that will now be trained again).
    kept = [r for r in read_metrics(path) if r["step"] <= start_step] if os.path.exists(path) else []
    self._jsonl = open(path, "w")
    for r in kept:
      self._jsonl.write(json.dumps(r) + "\n")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
    self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True) if use_bar else None
    self._step = start_step

  def info(self, message: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def log(self, record: dict) -> None:
    if not self.enabled:
      return
    step = record["step"]
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if (self._tb is not None and key != "step" and isinstance(value, (int, float))
          and math.isfinite(value)):
        self._tb.add_scalar(key, value, step)
    if "loss" in record:
      text = f"loss {record['loss']:.4f}  {record['tokens_per_sec']:,.0f} tok/s"
      if "model_tflops_per_sec" in record:
        text += f"  {record['model_tflops_per_sec']:,.3g} TFLOP/s/device"
      if "mfu" in record:
        text += f"  MFU {100 * record['mfu']:.1f}%"
      if self._bar is not None:
        self._bar.update(step - self._step)
        self._bar.set_postfix_str(text)
        self._step = step
      else:
        print(f"step {step}: {text}  lr {record.get('learning_rate', 0):.2e}", flush=True)
    elif "eval_loss" in record:
      bpb = record.get("eval_bpb", float("nan"))
      self.info(f"step {step}: eval_loss {record['eval_loss']:.4f}"
                + (f", {bpb:.4f} bits per byte" if bpb == bpb else ""))

  def close(self, plot: bool = True) -> None:
    """Closes the files (safe to call twice, e.g. on an error path)."""
    if not self.enabled or self._jsonl.closed:
      return
    if self._bar is not None:
      self._bar.close()
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if plot:
      plot_losses(os.path.join(self.workdir, "metrics.jsonl"),
                  os.path.join(self.workdir, "loss_curve.png"))


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, out_path: str, title: str | None = None) -> None:
  """Train and eval loss against step, one PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = read_metrics(metrics_path)
  # The mean over each logging interval is a steadier curve than the last step's loss.
  train = [(r["step"], r.get("loss_avg", r["loss"])) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train loss (mean since last log)")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
