"""Kestrel's neutral core: what the libraries share and nothing of theirs.

- ``core.errors``: ``ConfigError`` (one line: field, value, problem, fix) and
  ``Unsupported`` (an implementation cannot run these inputs).
- ``core.registry``: ``Registry``, a table of named implementations of one op;
  entries declare their platforms, what they support and whether they run per
  device; ``implementation=None | name | [names]`` picks, every failure is reported.
- ``core.platform``: the platform programs are traced for (``target`` / ``current``).
- ``core.placement``: logical axis names -> mesh axes (one rules table, installed by
  the runtime), ``constrain``, and ``per_device``: the one wrapper that runs a
  function per device under ``jax.shard_map``.
- ``core.vma``: typing helpers for values inside ``shard_map`` (varying mesh axes).
- ``core.params``: parameters tagged with logical axis names.

This package imports no other Kestrel package.
"""
