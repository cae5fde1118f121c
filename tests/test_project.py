"""Project-level checks: library layering, the install step's Python discovery, ablations."""
import ast
import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", ["attention", "moe", "optim"])
def test_libraries_do_not_import_lm_or_experiments(package):
  for path in (ROOT / package).rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [node.module]
      for name in names:
        assert name.split(".")[0] not in ("lm", "experiments"), f"{path} imports {name}"


@pytest.mark.skipif(any(any(pathlib.Path(r).glob("python3.1[2-9]")) for r in ("/usr/local/bin", "/usr/bin")),
                    reason="this machine has a system Python >= 3.12, which bootstrap rightly finds")
def test_bootstrap_without_python312_says_so(tmp_path):
  """With only Python 3.11 on PATH and no pyenv, the install step stops clearly."""
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "python3").symlink_to("/usr/bin/python3.11" if os.path.exists("/usr/bin/python3.11")
                                    else "/bin/false")
  for tool in ("bash", "dirname", "cat", "rm", "touch", "env"):
    src = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
    if src:
      (fake_bin / tool).symlink_to(src)
  env = {"PATH": str(fake_bin), "HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path / "nopyenv"),
         "KESTREL_VENV": str(tmp_path / "venv")}
  p = subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap.sh")], env=env,
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 1
  assert "needs Python >= 3.12" in p.stderr and "KESTREL_PYTHON" in p.stderr
  assert not (tmp_path / "venv").exists()


def test_ablation_runner_writes_a_record(tmp_path):
  from experiments.ablate import run_grid, write_record
  from experiments.configs.base import get_config
  c = get_config("tiny")
  c.train.steps, c.train.progress, c.train.plot = 6, "log", False
  results = run_grid(c, ["optimizer.name=adamw,muon"], [0, 1], str(tmp_path))
  assert [r["name"] for r in results] == ["name=adamw,seed=0", "name=adamw,seed=1",
                                          "name=muon,seed=0", "name=muon,seed=1"]
  write_record(str(tmp_path), "test", "base.py:tiny", [], results, target=6.0)
  readme = (tmp_path / "README.md").read_text()
  assert "steps to eval 6.0" in readme and "(2/2)" in readme  # eval loss starts below 6
  assert readme.count("| name=") == 4 + 2 and "| name=muon | 2 |" in readme
  assert (tmp_path / "loss_curves.png").stat().st_size > 1000
  runs = json.loads((tmp_path / "results.json").read_text())["runs"]
  assert {r["seed"] for r in runs} == {0, 1}
  cfg = json.loads((tmp_path / "runs" / "name=muon,seed=1" / "config.json").read_text())
  assert cfg["optimizer"]["name"] == "muon" and cfg["seed"] == 1
  assert not (tmp_path / "runs" / "name=muon,seed=1" / "checkpoints").exists()
  # Seeds differ; a second call reuses finished runs instead of training again.
  assert runs[0]["summary"]["loss"] != runs[1]["summary"]["loss"]
  again = run_grid(c, ["optimizer.name=adamw,muon"], [0, 1], str(tmp_path))
  assert [r["summary"] for r in again] == [r["summary"] for r in results]
  with pytest.raises(ValueError, match="unknown config field 'nme'"):
    run_grid(c, ["optimizer.nme=adamw"], [0], str(tmp_path / "bad"))
