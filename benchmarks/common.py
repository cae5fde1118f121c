"""What every benchmark script shares: timing and writing its table."""
import statistics
import time


def median_time(fn, *args, steps: int, warmup: int = 1) -> float:
  """Median wall time of ``fn(*args)`` over ``steps`` calls after ``warmup`` calls,
  waiting for the device each time."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def emit(lines: list[str], out: str = "") -> None:
  """Prints the table and, with ``out``, appends it to that record file."""
  text = "\n".join(lines) + "\n"
  print(text)
  if out:
    with open(out, "a") as f:
      f.write(text + "\n")
