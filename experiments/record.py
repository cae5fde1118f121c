"""The one record writer: a record folder's README.md (environment header, tables)
and results.json, for ``experiments.ablate`` and ``experiments.sparse_sweep``."""
import datetime
import json
import os
import platform
import subprocess


def environment() -> dict:
  """Date, commit (with ``+dirty`` when the tree has changes), hardware and versions."""
  import jax
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    commit += "+dirty" if dirty else ""
  except (OSError, subprocess.CalledProcessError):
    commit = "unknown"
  dev = jax.devices()[0]
  return {"date": datetime.date.today().isoformat(), "commit": commit,
          "hardware": f"{dev.platform}: {getattr(dev, 'device_kind', '?')} x{jax.device_count()}, "
                      f"{os.cpu_count()} host cores ({platform.machine()})",
          "jax": jax.__version__, "python": platform.python_version()}


def fmt(x, digits: int = 4) -> str:
  """A number for a table; ``-`` for None, ``nan`` for NaN."""
  if x is None:
    return "-"
  return "nan" if x != x else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list], numeric_from: int = 1) -> list[str]:
  """A Markdown table; columns from ``numeric_from`` on are right-aligned."""
  rule = ["---" if i < numeric_from else "---:" for i in range(len(header))]
  return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"] + [
      "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def header(title: str, env: dict, items: list[str]) -> list[str]:
  """The title and the bullet list every record starts with (date, commit, hardware)."""
  return [f"# {title}", "",
          f"- date: {env['date']}, commit: {env['commit']}",
          f"- hardware: {env['hardware']}; jax {env['jax']}, python {env['python']}",
          *[f"- {item}" for item in items], ""]


def write(out: str, lines: list[str], results: dict) -> None:
  """``<out>/README.md`` from ``lines`` and ``<out>/results.json`` from ``results``."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
