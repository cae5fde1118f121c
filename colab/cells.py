"""What the notebook writers (``make_*.py``) share: the install cell and the writer."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def install_cell() -> str:
  with open(os.path.join(HERE, "generate.ipynb")) as f:
    return "".join(json.load(f)["cells"][1]["source"])  # the notebooks' shared install cell


def write(name: str, cells: list) -> None:
  """Writes ``colab/<name>`` from ``(kind, source)`` cells (source None: the install cell)."""
  out = []
  for kind, source in cells:
    source = install_cell() if source is None else source
    cell = {"cell_type": kind, "metadata": {}, "source": source.splitlines(keepends=True)}
    if kind == "code":
      cell.update(execution_count=None, outputs=[])
    out.append(cell)
  nb = {"cells": out, "metadata": {"kernelspec": {"display_name": "Python 3",
                                                  "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5}
  with open(os.path.join(HERE, name), "w") as f:
    json.dump(nb, f, indent=1)
    f.write("\n")
