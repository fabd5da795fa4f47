"""The README's and docs' generated tables, written again from the results files (no measurement).

    python -m bench.docs_tables           # rewrite every generated block and page (= make docs)
    python -m bench.docs_tables --check   # change nothing; exit 1 naming what would change

A generated block is the text between the lines

    <!-- generated: NAME (python -m bench.docs_tables) -->
    <!-- end generated: NAME -->

in README.md or docs/*.md, written by BLOCKS[NAME] from the results files it names. A generated
page is a whole docs/ page written by its benchmark's page function (PAGES), run here on the
committed results file in a process of its own (each benchmark defines its own absl flags).
The tables themselves are in bench/tables_quality.py and bench/tables_speed.py. Every other
table in README.md and docs/*.md names its results files in a comment above it, `<!-- sources:
bench/results/a.json -->`, and bench/results_sources.py checks every number in it against them.
"""
import argparse
import functools
import glob
import os
import re
import subprocess
import sys

from bench import tables_quality as q
from bench import tables_speed as s
from bench.results_files import RESULTS

BEGIN = re.compile(r"^<!-- generated: (\S+) \(python -m bench\.docs_tables\) -->$")
END = "<!-- end generated: {} -->"

# docs page -> (module, function of the results dict that returns the page, results file).
PAGES = {
    "docs/plan_simulation.md": ("bench.plan_simulation", "table", "plan_simulation.json"),
    "docs/build_10m.md": ("bench.build_10m", "page", "build_10m.json"),
    "docs/global_searchers.md": ("bench.global_searchers", "page", "global_searchers.json"),
    "docs/open_reads.md": ("bench.open_reads", "page", "open_reads.json"),
    "docs/sample_smollm2.md": ("bench.sample_smollm2", "page", "sample_smollm2.json"),
    "docs/joined_examples.md": ("bench.joined_examples", "page", "joined_examples.json"),
}

# docs pages that a benchmark writes in the same run as its results (it needs a database, so
# they are not written again here): checked against that results file.
BENCH_PAGES = {"docs/cost_model_28b.md": "bench/results/cost_model_28b.json"}

# NAME -> (function, the results files it reads).
BLOCKS = {
    "readme_results": (q.readme_results, [
        "make_demo_fresh.json", "figures_dup.json", "figures_default.json", "scaling_tiny.json",
        "fact_recall.json", "train_step.json", "gpu/reference_fp32.json",
        "gpu/reference_bf16.json", "aot_compile.jsonl", "embed_throughput.json",
        "ann_recall.json", "global_index_default.json", "global_index_scaling.json",
        "generate_speed.json", "service_latency.json"]),
    "readme_demo_time": (q.readme_demo_time, ["make_demo_fresh.json"]),
    "param_counts": (q.param_counts, ["param_counts.json"]),
    "figures_dup": (functools.partial(q.figures_tables, "figures_dup.json"), ["figures_dup.json"]),
    "figures_default": (functools.partial(q.figures_tables, "figures_default.json"),
                        ["figures_default.json"]),
    "scaling_tiny": (q.scaling_tables, ["scaling_tiny.json"]),
    "train_step": (s.train_step_table, ["train_step.json", "train_step_rope.json"]),
    "gpu_step": (s.gpu_table, ["gpu/reference_fp32.json", "gpu/reference_bf16.json"]),
    "embed_throughput": (s.embed_table, ["embed_throughput.json"]),
    "generate_speed": (s.generate_table, ["generate_speed.json"]),
    "service_latency": (s.service_table, ["service_latency.json"]),
    "verify_on_read": (s.verify_table, ["verify_on_read.json"]),
    "aot_compile": (s.aot_table, ["aot_compile.jsonl"]),
    "eval_retrievers": (q.eval_retrievers_table, ["eval_retrievers.json"]),
    "gap_trend": (q.gap_trend_table, ["retro_gap_trend.json"]),
    "gap_fit": (q.gap_fit_table, ["retro_gap_trend.json"]),
    "beam_transforms": (s.beam_transforms_table, ["beam_index_neighbours.json"]),
    "global_index_default": (s.global_index_table, ["global_index_default.json"]),
    "copy_alignment": (q.copy_alignment_table, ["dup_copy_alignment.json"]),
    "service_abuse": (s.service_abuse_table, ["service_abuse.json"]),
    "fact_recall": (q.fact_recall_table, ["fact_recall.json"]),
    "global_index_scaling": (s.global_scaling_table, ["global_index_scaling.json"]),
    "ann_quiet": (s.ann_quiet_table, ["ann_recall_quiet.json"]),
    "ann_reference": (s.ann_reference_table, ["ann_recall_kernel_docs_84k.json"]),
    "demo_dup": (q.demo_dup, ["make_demo_fresh.json"]),
    "db_build_stages": (s.db_build_stages, ["make_demo_fresh.json"]),
    "make_targets": (s.make_targets_table, ["make_targets.json", "make_demo_fresh.json",
                                                "aot_compile.jsonl"]),
}


def markdown_files() -> list[str]:
  return ["README.md"] + sorted(glob.glob("docs/*.md"))


def rewrite_blocks(text: str) -> str:
  """`text` with every generated block written again."""
  lines, out, i = text.split("\n"), [], 0
  while i < len(lines):
    out.append(lines[i])
    m = BEGIN.match(lines[i])
    i += 1
    if not m:
      continue
    name = m.group(1)
    if name not in BLOCKS:
      raise ValueError(f"unknown generated block {name!r}")
    end = lines.index(END.format(name), i)
    out += BLOCKS[name][0]().split("\n") + [lines[end]]
    i = end + 1
  return "\n".join(out)


def page_text(doc: str) -> str:
  """The generated page `doc` as its benchmark writes it from the committed results file."""
  module, fn, results = PAGES[doc]
  code = (f"import json, sys, {module} as m\n"
          f"sys.stdout.write(m.{fn}(json.load(open({os.path.join(RESULTS, results)!r}))))")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout


def regenerate(check: bool) -> list[str]:
  """Writes (or with `check`, only compares) every generated block and page; returns the files
  that differ(ed)."""
  changed = []
  new = {f: rewrite_blocks(open(f).read()) for f in markdown_files()}
  new.update({doc: page_text(doc) for doc in PAGES})
  for f, text in new.items():
    with open(f) as fh:
      if fh.read() == text:
        continue
    changed.append(f)
    if not check:
      with open(f, "w") as fh:
        fh.write(text)
  return changed


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
  args = p.parse_args()
  changed = regenerate(args.check)
  for f in changed:
    print(("differs: " if args.check else "rewrote: ") + f)
  if args.check and changed:
    sys.exit(1)


if __name__ == "__main__":
  main()
