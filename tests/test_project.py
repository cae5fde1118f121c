"""Project-level checks: the layering of the packages (no cycles, independent libraries,
no layer reading the mesh), the install step's Python discovery, ablations."""
import ast
import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("core", "attention", "moe", "optim", "lm", "experiments")
LIBRARIES = ("attention", "moe", "optim")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
  """The Kestrel modules ``path`` imports, anywhere in the file (function-level
  imports too: they are cycles all the same, only later). A package that discovers
  its modules with pkgutil imports all of them."""
  source = path.read_text()
  out = set()
  for node in ast.walk(ast.parse(source)):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
               for a in node.names]
    out.update(n for n in names if n.split(".")[0] in PACKAGES)
  if "pkgutil.iter_modules" in source:
    me = _module_name(path)
    out.update(m for m in modules if m.startswith(me + ".") and m.count(".") == me.count(".") + 1)
  return {n for n in out if n in modules}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_no_import_cycles():
  graph = _graph()
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        cycle = stack[stack.index(nxt):] + [nxt]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node)


def test_the_checker_sees_a_cycle_and_lazy_imports(tmp_path, monkeypatch):
  """The two checks above would catch what the issue found (a lazy import back)."""
  (tmp_path / "attention").mkdir()
  (tmp_path / "attention" / "ops.py").write_text("def f():\n  from attention import kern\n")
  (tmp_path / "attention" / "kern.py").write_text("def g():\n  from attention.ops import f\n")
  modules = {"attention.ops": tmp_path / "attention" / "ops.py",
             "attention.kern": tmp_path / "attention" / "kern.py"}
  assert _imports(modules["attention.ops"], modules) == {"attention.kern"}
  assert _imports(modules["attention.kern"], modules) == {"attention.ops"}


@pytest.mark.parametrize("package", LIBRARIES + ("core",))
def test_libraries_import_only_core(package):
  """attention/, moe/ and optim/ import neither each other nor lm/ or experiments/;
  core/ imports nothing of ours."""
  allowed = {package} | ({"core"} if package != "core" else set())
  graph = _graph()
  for module, deps in graph.items():
    if module.split(".")[0] != package:
      continue
    for dep in deps:
      assert dep.split(".")[0] in allowed, f"{module} imports {dep}"


# What a layer may not touch: meshes are the placement's business (core/placement.py,
# lm/sharding.py and the runtime that builds them).
_MESH_NAMES = {"get_abstract_mesh", "set_mesh", "use_abstract_mesh", "Mesh", "AbstractMesh",
               "mesh", "axis_types"}


@pytest.mark.parametrize("where", ["attention", "moe", "optim", "lm/model.py", "lm/losses"])
def test_no_layer_reads_the_mesh(where):
  target = ROOT / where
  paths = [target] if target.is_file() else sorted(target.rglob("*.py"))
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text())):
      name = (node.id if isinstance(node, ast.Name) else node.attr
              if isinstance(node, ast.Attribute) else node.arg if isinstance(node, ast.arg)
              else None)
      assert name not in _MESH_NAMES, f"{path.relative_to(ROOT)}:{node.lineno} uses {name!r}"


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
  from conftest import tiny

  from core.errors import ConfigError
  from experiments.ablate import run_grid, write_record
  c = tiny(train__steps=4, train__eval_every=2)
  results = run_grid(c, ["optimizer.name=adamw,muon"], [0, 1], str(tmp_path))
  assert [r["name"] for r in results] == ["name=adamw,seed=0", "name=adamw,seed=1",
                                          "name=muon,seed=0", "name=muon,seed=1"]
  write_record(str(tmp_path), "test", "base.py:tiny", [], results, target=6.0)
  readme = (tmp_path / "README.md").read_text()
  assert "steps to eval 6.0" in readme and "(2/2)" in readme  # eval loss starts below 6
  assert readme.count("| name=") == 4 + 2 and "| name=muon | 2 |" in readme
  assert "commit:" in readme
  assert (tmp_path / "loss_curves.png").stat().st_size > 1000
  runs = json.loads((tmp_path / "results.json").read_text())["runs"]
  assert {r["seed"] for r in runs} == {0, 1}
  run_dir = tmp_path / "runs" / "name=muon,seed=1"
  cfg = json.loads((run_dir / "config.json").read_text())
  assert cfg["optimizer"]["name"] == "muon" and cfg["seed"] == 1
  # A record keeps each run's metrics and config, not checkpoints or TensorBoard events.
  assert sorted(os.listdir(run_dir)) == ["config.json", "metrics.jsonl", "summary.json"]
  # Seeds differ; a second call reuses finished runs instead of training again.
  assert runs[0]["summary"]["loss"] != runs[1]["summary"]["loss"]
  again = run_grid(c, ["optimizer.name=adamw,muon"], [0, 1], str(tmp_path))
  assert [r["summary"] for r in again] == [r["summary"] for r in results]
  with pytest.raises(ConfigError, match="unknown config field 'nme'"):
    run_grid(c, ["optimizer.nme=adamw"], [0], str(tmp_path / "bad"))
