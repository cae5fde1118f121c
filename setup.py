"""Kestrel: a JAX research codebase for efficient LLM architectures."""
from pathlib import Path

from setuptools import setup

_REQ = Path(__file__).parent / "requirements.txt"
_DEV_ONLY = ("pytest", "nbclient", "nbformat", "ipykernel")


def _requirements():
  lines = [l.split("#")[0].strip() for l in _REQ.read_text().splitlines()]
  return [l for l in lines if l and not l.startswith(_DEV_ONLY)]


setup(
    name="kestrel",
    version="0.1.0",
    description="JAX research codebase for efficient LLMs: MoE, sparse/linear attention, Muon.",
    python_requires=">=3.12",
    packages=[
        "core", "attention", "attention.kernels", "moe", "moe.kernels", "optim", "lm",
        "lm.data", "lm.losses", "experiments", "experiments.configs",
    ],
    package_data={"lm.data": ["corpus/*.txt", "corpus/*.gz", "corpus/*.json"]},
    install_requires=_requirements(),
)
