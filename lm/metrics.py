"""Metrics out of the loop: metrics.jsonl, TensorBoard events, a progress bar or log lines."""
import json
import math
import os
import sys

from tensorboardX import SummaryWriter
from tqdm import tqdm


class MetricsLogger:
  """Writes each record to ``metrics.jsonl`` and TensorBoard and shows progress.

  ``progress``: 'bar' (tqdm), 'log' (plain lines), or 'auto' (bar on a terminal).
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               progress: str = "auto", enabled: bool = True):
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
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    if "loss" in record:
      text = f"loss {record['loss']:.4f}  {record['tokens_per_sec']:,.0f} tok/s"
      if self._bar is not None:
        self._bar.update(step - self._step)
        self._bar.set_postfix_str(text)
        self._step = step
      else:
        print(f"step {step}: {text}  lr {record.get('learning_rate', 0):.2e}", flush=True)
    elif "eval_loss" in record:
      self.info(f"step {step}: eval_loss {record['eval_loss']:.4f}")

  def close(self, plot: bool = True) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._jsonl.close()
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
