"""Results are produced, never typed: every number in a README/docs table comes from a results
file that names the repository command that wrote it, and `make docs` (bench.docs_tables) over
the committed results changes no file."""
import json
import os

from bench import docs_tables, results_files, results_sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_table_number_has_a_results_file(monkeypatch):
  monkeypatch.chdir(ROOT)
  assert results_sources.unsourced_numbers() == []


def test_a_typed_number_is_caught(monkeypatch, tmp_path):
  # The check itself: a table citing a results file that does not hold one of its numbers.
  monkeypatch.chdir(tmp_path)
  os.makedirs("docs")
  with open("results.json", "w") as f:
    json.dump({"bpb": 2.45701}, f)
  with open("README.md", "w") as f:
    f.write("<!-- sources: results.json -->\n\n| model | bpb |\n|---|---|\n| a | 2.4570 |\n"
            "| b | 2.4549 |\n\n| no sources | 3.1 |\n")
  assert results_sources.unsourced_numbers() == [
      "README.md:6: 2.4549 is in none of results.json",
      "README.md:8: a table with numbers and no `<!-- sources: ... -->`"]


def test_every_results_file_names_the_command_that_wrote_it(monkeypatch):
  monkeypatch.chdir(ROOT)
  assert results_sources.unproduced_results() == []


def test_a_results_file_without_its_command_is_caught(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  os.makedirs("bench/results")
  with open("bench/writer.py", "w") as f:
    f.write('OUT = "bench/results/written.json"\n')
  records = {"written.json": {"command": "python -m bench.writer", "commit": "abc", "date": "d"},
             "typed.json": {"bpb": 1.0},
             "gone.json": {"command": "python -m bench.deleted", "commit": "abc", "date": "d"},
             "other.json": {"command": "python -m bench.writer", "commit": "abc", "date": "d"}}
  for name, rec in records.items():
    with open(os.path.join("bench/results", name), "w") as f:
      json.dump(rec, f)
  results_files.load.cache_clear()
  try:
    assert results_sources.unproduced_results() == [
        "bench/results/gone.json: its command runs no file of the repository: "
        "python -m bench.deleted",
        "bench/results/other.json: bench/writer.py (its command) does not write it",
        "bench/results/typed.json: names no command, commit, date"]
  finally:
    results_files.load.cache_clear()


def test_regenerating_the_tables_changes_nothing(monkeypatch):
  monkeypatch.chdir(ROOT)
  assert docs_tables.regenerate(check=True) == []
