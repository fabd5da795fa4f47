"""The results files (bench/results/) as the docs read them, and how a figure is printed."""
import functools
import json
import os

RESULTS = "bench/results"


@functools.cache
def load(name: str):
  """bench/results/NAME as parsed JSON (a list of records for .jsonl)."""
  with open(os.path.join(RESULTS, name)) as f:
    if name.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    return json.load(f)


def f4(x: float) -> str:
  """A bits-per-byte figure."""
  return f"{x:.4f}"


def d4(x: float) -> str:
  """A difference, signed."""
  return f"{x:+.4f}"


def ci(d: dict, digits: int = 4) -> str:
  """A difference with its 95% interval: `-0.2346 [-0.4138, -0.1017]`."""
  lo, hi = d["ci95"]
  return f"{d['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def bold_ci(d: dict) -> str:
  """ci(d), in bold where the interval excludes zero."""
  return f"**{ci(d)}**" if d["excludes_zero"] else ci(d)


def ratio_ci(d: dict) -> str:
  """A ratio with its 95% interval: `0.309 [0.273, 0.384]`."""
  lo, hi = d["ci95"]
  return f"{d['ratio']:.3f} [{lo:.3f}, {hi:.3f}]"
