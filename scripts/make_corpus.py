"""Builds the embedded corpora ``lm/data/corpus/python_docs.txt.gz`` and ``python_code.txt.gz``.

``python_code`` (the second source of ``experiments/configs/mixture.py``) is the same
modules' code with every docstring removed, re-printed by ``ast.unparse`` (comments
dropped), one document per module, capped at ``MAX_CODE_BYTES``.

The corpus is the docstrings of the CPython standard library of the interpreter
running this script: one document per module (the module docstring followed by
its class and function docstrings in source order, each cleaned with
``inspect.cleandoc`` semantics and joined by blank lines). Documents are
separated by a line holding only the ASCII record separator ``\\x1e``.

Sources are parsed with ``ast``; no module is imported. Files are visited in
sorted relative-path order and the gzip header carries no timestamp, so the
output is byte-for-byte reproducible for a given interpreter version.

Usage::

  .venv/bin/python scripts/make_corpus.py            # writes lm/data/corpus/
  .venv/bin/python scripts/make_corpus.py --out DIR  # elsewhere
"""
import argparse
import ast
import gzip
import hashlib
import pathlib
import sys
import sysconfig

RECORD_SEPARATOR = "\x1e"  # on its own line between documents
MAX_RAW_BYTES = 3_000_000  # stop adding documents past this much utf-8 text
MAX_CODE_BYTES = 1_500_000  # the code corpus is smaller: a second source, not the first
MIN_DOC_BYTES = 200  # modules with less docstring text than this are skipped

# Any path component in this set excludes the file: tests, GUI code, vendored or
# third-party code, and generated data tables.
SKIP_PARTS = frozenset({
    "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo",
    "site-packages", "dist-packages", "lib2to3", "ensurepip", "lib-dynload",
    "pydoc_data", "__pycache__", "encodings", "msilib", "venv",
})

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)

_PSF_START = "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"
_PSF_END = "BEOPEN.COM LICENSE AGREEMENT"


def _docstrings(node: ast.AST):
  """Yields the docstrings of ``node`` and its nested defs, in source order."""
  if isinstance(node, (ast.Module, *_DEFS)):
    doc = ast.get_docstring(node, clean=True)
    if doc:
      yield doc
  for child in ast.iter_child_nodes(node):
    if isinstance(child, _DEFS) or not isinstance(child, ast.expr):
      yield from _docstrings(child)


def module_document(path: pathlib.Path) -> str:
  """Returns one module's docstrings joined by blank lines ('' if none)."""
  try:
    tree = ast.parse(path.read_bytes(), filename=str(path))
  except (SyntaxError, ValueError, UnicodeDecodeError):
    return ""
  seen, parts = set(), []
  for doc in _docstrings(tree):
    doc = doc.strip().replace(RECORD_SEPARATOR, " ")
    if doc and doc not in seen:
      seen.add(doc)
      parts.append(doc)
  return "\n\n".join(parts)


def module_code(path: pathlib.Path) -> str:
  """Returns one module's code without docstrings or comments ('' if it does not parse)."""
  try:
    tree = ast.parse(path.read_bytes(), filename=str(path))
  except (SyntaxError, ValueError, UnicodeDecodeError):
    return ""
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, *_DEFS)) and node.body:
      first = node.body[0]
      if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
          and isinstance(first.value.value, str)):
        node.body = node.body[1:] or [ast.Pass()]
  return ast.unparse(tree).replace(RECORD_SEPARATOR, " ")


def build_code_corpus(stdlib: pathlib.Path) -> list[str]:
  """Returns the modules' code, deduplicated, capped at ``MAX_CODE_BYTES`` (modules that
  would pass the cap are skipped, later smaller ones still taken)."""
  return _collect(stdlib, module_code, MAX_CODE_BYTES, stop_at_cap=False)


def _collect(stdlib: pathlib.Path, extract, cap: int, *, stop_at_cap: bool) -> list[str]:
  """``extract(path)`` of each standard-library file: deduplicated, at least
  ``MIN_DOC_BYTES`` each, at most ``cap`` bytes in all (stop there, or skip past it)."""
  docs, hashes, total = [], set(), 0
  for path in stdlib_files(stdlib):
    doc = extract(path)
    size = len(doc.encode("utf-8"))
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    if size < MIN_DOC_BYTES or digest in hashes:
      continue
    if total + size > cap:
      if stop_at_cap:
        break
      continue
    hashes.add(digest)
    docs.append(doc)
    total += size
  return docs


def _write_gz(path: pathlib.Path, docs: list[str]) -> int:
  raw = (f"\n{RECORD_SEPARATOR}\n".join(docs) + "\n").encode("utf-8")
  with open(path, "wb") as f:
    with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
      gz.write(raw)
  return len(raw)


def stdlib_files(stdlib: pathlib.Path) -> list[pathlib.Path]:
  """Returns the standard library's ``.py`` files to use, sorted by relative path."""
  files = []
  for path in stdlib.rglob("*.py"):
    rel = path.relative_to(stdlib)
    if SKIP_PARTS.isdisjoint(rel.parts[:-1]) and not rel.name.startswith("test_"):
      files.append(rel)
  return [stdlib / rel for rel in sorted(files, key=lambda p: p.as_posix())]


def build_corpus(stdlib: pathlib.Path) -> list[str]:
  """Returns the deduplicated documents, capped at ``MAX_RAW_BYTES`` of text."""
  return _collect(stdlib, module_document, MAX_RAW_BYTES, stop_at_cap=True)


def psf_license(stdlib: pathlib.Path) -> str:
  """Returns the PSF License Agreement section of the interpreter's LICENSE.txt."""
  text = (stdlib / "LICENSE.txt").read_text(encoding="utf-8")
  start, end = text.index(_PSF_START), text.index(_PSF_END)
  return text[start:end].rstrip() + "\n"


def license_text(stdlib: pathlib.Path, n_docs: int) -> str:
  """Returns the LICENSE.txt written next to the corpus."""
  version = ".".join(map(str, sys.version_info[:3]))
  return (
      "python_docs.txt.gz: the embedded default corpus of Kestrel.\n\n"
      f"The text is extracted from the docstrings of the standard library of\n"
      f"CPython {version} (Python 3.12), Copyright (c) 2001-2023 Python Software\n"
      "Foundation; All Rights Reserved. It is distributed under the PSF License\n"
      "Agreement reproduced below.\n\n"
      "Summary of changes (clause 3 of the agreement): only docstrings were kept\n"
      "(module, class and function docstrings, parsed with `ast`, whitespace-\n"
      "cleaned); all code was dropped; test suites, GUI modules, vendored and\n"
      "generated modules were excluded; duplicate docstrings and documents were\n"
      f"removed. The result is {n_docs} documents, one per module, built by\n"
      "scripts/make_corpus.py.\n\n\n" + psf_license(stdlib))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  here = pathlib.Path(__file__).resolve().parent.parent
  parser.add_argument("--out", type=pathlib.Path, default=here / "lm" / "data" / "corpus")
  parser.add_argument("--only", choices=("docs", "code"), default=None,
                      help="write only one of the two corpora")
  args = parser.parse_args(argv)
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  args.out.mkdir(parents=True, exist_ok=True)
  if args.only != "docs":
    code = build_code_corpus(stdlib)
    size = _write_gz(args.out / "python_code.txt.gz", code)
    print(f"python_code.txt.gz: {len(code)} documents, {size:,} raw bytes")
    if args.only == "code":
      return
  docs = build_corpus(stdlib)
  text = f"\n{RECORD_SEPARATOR}\n".join(docs) + "\n"
  raw = text.encode("utf-8")
  args.out.mkdir(parents=True, exist_ok=True)
  gz_path = args.out / "python_docs.txt.gz"
  with open(gz_path, "wb") as f:
    with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
      gz.write(raw)
  (args.out / "LICENSE.txt").write_text(license_text(stdlib, len(docs)), encoding="utf-8")
  print(f"{gz_path}: {len(docs)} documents, {len(raw):,} raw bytes, "
        f"{gz_path.stat().st_size:,} gzipped bytes")


if __name__ == "__main__":
  main()
