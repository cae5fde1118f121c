"""The Colab notebooks run top to bottom on CPU."""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name: str, workdir, monkeypatch) -> str:
  """Executes ``colab/<name>`` with its workdir at ``workdir``; returns its text outputs."""
  monkeypatch.setenv("KESTREL_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  outputs = _run("quickstart.ipynb", tmp_path / "run", monkeypatch)
  assert "jax" in outputs and "'step': 300" in outputs
  assert os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_data_notebook_runs(tmp_path, monkeypatch):
  outputs = _run("data.ipynb", tmp_path, monkeypatch)
  assert "round trip exact: True" in outputs and "bits/byte" in outputs
  assert (tmp_path / "run" / "tokenizer.json").exists()
  assert (tmp_path / "pretok" / "index.json").exists()


def test_generate_notebook_runs(tmp_path, monkeypatch):
  outputs = _run("generate.ipynb", tmp_path, monkeypatch)
  assert "speculative output equals plain greedy: True" in outputs
  assert "fp32-cache output equals the uncached one: True" in outputs
  assert "tokens per target call" in outputs


def test_compress_notebook_runs(tmp_path, monkeypatch):
  outputs = _run("compress.ipynb", tmp_path, monkeypatch)
  assert "stored int4 evaluates like PTQ int4: True" in outputs
  assert "2:4 sparsity of the pruned matrices 0.5" in outputs
  assert "still 2 of every 4: True" in outputs
  assert "distilled student (d_model 32) eval loss" in outputs


def test_finetune_notebook_runs(tmp_path, monkeypatch):
  outputs = _run("finetune.ipynb", tmp_path, monkeypatch)
  assert "merged run evaluates like the adapters: True" in outputs
  assert "DPO step 1: reward accuracy 0.00" in outputs
  acc = float(outputs.split("held-out pairs: reward accuracy ")[1].split(",")[0])
  assert acc >= 0.9, outputs
