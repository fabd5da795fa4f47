"""The checks behind tests/test_results_sources.py: every number in a README/docs table comes
from a results file named above the table (or the table is a generated block), and every results
file names the command, commit and date of the run that wrote it."""
import glob
import json
import os
import re

from bench.docs_tables import BEGIN, BENCH_PAGES, END, PAGES, markdown_files
from bench.results_files import RESULTS, load

SOURCES = re.compile(r"^<!-- sources: (.+) -->$")
# A number in a table cell: not part of a word, a path, a version or a shape (d512, v5e:4x4, L2).
NUMBER = re.compile(r"(?<![\w.:/^-])([-+]?\d[\d,]*(?:\.\d+)?)(?![\w:/^]|\.\d)")
# How a results value may be shown: as is, as a percentage, seconds in ms, in thousands or
# millions, a duration in minutes or hours, bytes in GiB or GB.
SCALES = (1, 100, 1e3, 1e-3, 1e-6, 1 / 60, 1 / 3600, 1 / 2**30, 1e-9)


def numbers(x):
  """Every number in a parsed results file (and in its strings)."""
  if isinstance(x, bool):
    return
  if isinstance(x, (int, float)):
    yield float(x)
  elif isinstance(x, dict):
    for k, v in x.items():
      yield from numbers(k)
      yield from numbers(v)
  elif isinstance(x, list):
    for v in x:
      yield from numbers(v)
  elif isinstance(x, str):
    for m in re.findall(r"-?\d+(?:\.\d+)?", x.replace(",", "")):
      yield float(m)


def shown(value: float, text: str) -> bool:
  """Whether `text` (a number as a table shows it) is `value` at some SCALES, to its digits."""
  s = text.replace(",", "").lstrip("+")
  digits = len(s.split(".")[1]) if "." in s else 0
  tol = 0.5 * 10**-digits * (1 + 1e-9)
  x = abs(float(s))
  return any(abs(abs(value) * k - x) <= tol for k in SCALES)


def table_numbers(line: str) -> list[str]:
  """The numbers of a table row, leaving out code spans and link targets."""
  line = re.sub(r"`[^`]*`", "", line)
  line = re.sub(r"\]\([^)]*\)", "]", line)
  return NUMBER.findall(line)


def tables(path: str):
  """(first line number, rows, the sources comment above or None) of each table in `path`
  outside generated blocks."""
  lines = open(path).read().split("\n")
  i, block = 0, None
  while i < len(lines):
    m = BEGIN.match(lines[i])
    if m:
      block = m.group(1)
    elif block and lines[i] == END.format(block):
      block = None
    elif not block and lines[i].startswith("|"):
      j = i
      while j < len(lines) and lines[j].startswith("|"):
        j += 1
      k = i - 1
      while k >= 0 and not lines[k].strip():
        k -= 1
      src = SOURCES.match(lines[k]) if k >= 0 else None
      yield i + 1, lines[i:j], src.group(1).split() if src else None
      i = j
      continue
    i += 1


def unsourced_numbers() -> list[str]:
  """`file:line: number` for each number in a README/docs table outside generated blocks and
  pages that no results file named in the table's sources comment holds. A comment
  `<!-- sources: none: REASON -->` marks a table of the code's layout or settings (no
  measurement)."""
  problems = []
  for path in markdown_files():
    if path in PAGES:
      continue
    for first, rows, sources in tables(path):
      nums = [(first + r, n) for r, row in enumerate(rows) if not re.fullmatch(r"[|:\- ]+", row)
              for n in table_numbers(row)]
      if not nums:
        continue
      if path in BENCH_PAGES:
        sources = [BENCH_PAGES[path]]
      if sources and sources[0] == "none:" and len(sources) > 1:
        continue  # a table of the code's settings or layout, with its reason
      if sources is None:
        problems.append(f"{path}:{first}: a table with numbers and no `<!-- sources: ... -->`")
        continue
      values = []
      for src in sources:
        if not os.path.exists(src):
          problems.append(f"{path}:{first}: sources names {src}, which does not exist")
          continue
        with open(src) as f:
          txt = f.read()
        recs = ([json.loads(x) for x in txt.splitlines() if x.strip()] if src.endswith(".jsonl")
                else [json.loads(txt)])
        values += sorted({v for r in recs for v in numbers(r)})
      problems += [f"{path}:{line}: {n} is in none of {', '.join(sources)}"
                   for line, n in nums if not any(shown(v, n) for v in values)]
  return problems


DATE_KEYS = ("date", "date_utc", "start_utc", "measured_at_utc")


def provenance(record: dict) -> dict:
  """{command, commit, date} a results record names (its `provenance`, else top-level keys)."""
  p = dict(record.get("provenance") or {})
  p.setdefault("command", record.get("command"))
  p.setdefault("commit", record.get("commit"))
  p.setdefault("date", next((record[k] for k in DATE_KEYS if record.get(k)), None))
  return p


def command_source(command: str) -> str | None:
  """The repository file that `command` runs (`python -m MODULE`, `bash PATH`), or None."""
  m = re.search(r"python3? -m ([\w.]+)", command)
  if m:
    base = m.group(1).replace(".", "/")
    for cand in (base + ".py", base + "/__main__.py"):
      if os.path.exists(cand):
        return cand
    return None
  m = re.search(r"bash (\S+\.sh)", command)
  return m.group(1) if m and os.path.exists(m.group(1)) else None


def unproduced_results() -> list[str]:
  """Each results file that names no command, commit or date, or whose command runs no file of
  the repository, or runs one that does not write it."""
  problems = []
  for path in sorted(glob.glob(os.path.join(RESULTS, "**", "*.json*"), recursive=True)):
    name = os.path.relpath(path, RESULTS)
    recs = load(name)
    for r in (recs if isinstance(recs, list) else [recs]):
      p = provenance(r)
      missing = [k for k in ("command", "commit", "date") if not p.get(k)]
      if missing:
        problems.append(f"{path}: names no {', '.join(missing)}")
        continue
      src = command_source(p["command"])
      if src is None:
        problems.append(f"{path}: its command runs no file of the repository: {p['command']}")
        continue
      stem = os.path.splitext(os.path.basename(path))[0]
      with open(src) as f:
        writes = os.path.basename(path) in f.read() or stem in p["command"]
      if not writes:
        problems.append(f"{path}: {src} (its command) does not write it")
  return problems
