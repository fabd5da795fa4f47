"""One flag vocabulary: every command's --help lists the shared flags (retro_jax/flags.py) it takes
with the same type, default and meaning, and an old spelling stops with the new one's name."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from retro_jax import flags as shared

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
# Each command and the shared flags it takes.
TAKES = {
    "build_db": {"db", "num_neighbours", "backend", "embed_batch_size", "max_docs", "config"},
    "edit_db": {"db", "backend", "embed_batch_size"},
    "evaluate": {"workdir", "step", "db", "num_neighbours", "retrieval", "backend", "service",
                 "service_timeout_s", "max_docs", "mesh"},
    "sample": {"workdir", "step", "size", "db", "num_neighbours", "retrieval", "backend",
               "service", "service_timeout_s", "mesh"},
    "train": {"config", "workdir"},
    "retrofit": {"config", "workdir"},
    "aot_compile": {"config"},
    "demo": {"db", "max_docs"},
    "figures": {"config"},
    "scaling": {"config"},
    "fact_recall": {"workdir", "db"},
    "retrieval.serve": {"db", "backend"},
    "pretrained.export_smollm2": {"workdir", "db"},
}
# absl's type of each kind of shared flag.
FLAG_TYPE = {"string": "string", "integer": "int", "float": "float", "list": "comma separated list of strings",
             "enum": "string enum", "config": "config object"}
# Imports each command in turn (one process: the heavy imports once) and prints the flags its
# --help lists (absl's key flags of the command's module), then drops them for the next command.
DUMP = """
import importlib, json, sys
from absl import flags
out = {}
for command in sys.argv[1:]:
  module = "retro_jax." + command
  importlib.import_module(module)
  own = flags.FLAGS.get_key_flags_for_module(module)
  out[command] = {f.name: {"type": f.flag_type(), "default": f.default, "help": f.help}
                  for f in own}
  for f in own:
    delattr(flags.FLAGS, f.name)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps():
  proc = subprocess.run([sys.executable, "-c", DUMP, *TAKES], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])


def _shared_flags(own: dict) -> set[str]:
  """The shared flags a command takes (not an old spelling kept only to name its replacement)."""
  return {n for n in own if n in shared.SHARED and not own[n]["help"].startswith("removed:")}


@pytest.mark.parametrize("command", sorted(TAKES))
def test_every_command_lists_its_shared_flags_as_defined_once(helps, command):
  own = helps[command]
  assert _shared_flags(own) == TAKES[command]
  for name in TAKES[command]:
    want, got = shared.SHARED[name], own[name]
    text = re.sub(r"^<[^>]*>: ", "", got["help"])  # an enum's choices come first
    assert text.startswith(want.help), (command, name, got["help"])
    assert got["type"] == FLAG_TYPE[want.kind], (command, name, got["type"])
    assert got["default"] == want.default, (command, name, got["default"])
  for old, new in shared.RENAMED.items():  # an old spelling only stops with the new name
    if old in own:
      assert own[old]["help"] == f"removed: use --{new}", (command, old)


def test_a_shared_flag_has_one_type_and_default_across_commands(helps):
  seen = {}
  for own in helps.values():
    for name in _shared_flags(own):
      seen.setdefault(name, set()).add((own[name]["type"], json.dumps(own[name]["default"])))
  assert set(seen) == set(shared.SHARED)  # every shared flag is some command's
  assert all(len(v) == 1 for v in seen.values()), seen


def test_help_shows_the_shared_flags_with_their_defaults():
  proc = subprocess.run([sys.executable, "-m", "retro_jax.sample", "--help"], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300)
  text = proc.stdout + proc.stderr
  for name in TAKES["sample"]:
    assert f"--{name}: " in text, name
  assert "(default: 'all')" in text.split("--retrieval: ")[1].split("--")[0]


@pytest.mark.parametrize("command,args,new", [
    ("build_db", ["--db=/nonexistent", "--k=3"], "--num_neighbours"),
    ("scaling", ["--sweep=experiments/sweep_tiny.py"], "--config"),
    ("aot_compile", ["--config=experiments/retro_172m.py", "--size=172m"],
     "--config=experiments/retro_<size>.py"),
    ("aot_compile", ["--config=experiments/retro_172m.py", "--noretrieval"], "--config.retrieval"),
])
def test_an_old_spelling_stops_naming_the_new_one(command, args, new):
  proc = subprocess.run([sys.executable, "-m", f"retro_jax.{command}", *args], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "was removed: use " + new in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["--config=experiments/nope.py"], "No such file or directory"),
    (["--config=experiments/tiny.py", "--config.seq_lne=64"], "--config.seq_lne=64"),
    (["--config={bad}"], "SyntaxError"),
    (["--config=experiments/tiny.py", "--config.seq_len=abc"], "--config.seq_len=abc"),
], ids=["missing-file", "unknown-field", "file-does-not-load", "bad-value"])
def test_an_experiment_file_that_does_not_fit_is_one_line(tmp_path, args, needle):
  bad = tmp_path / "bad_experiment.py"
  bad.write_text("def get_config(:\n")
  p = subprocess.run([sys.executable, "-m", "retro_jax.train", f"--workdir={tmp_path / 'wd'}",
                      *[a.format(bad=bad) for a in args]], cwd=REPO,
                     env=ENV, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
  lines = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and needle in lines[0], p.stderr[-2000:]
  assert not (tmp_path / "wd").exists()


# `python -m retro_jax.NAME --flag...` as the package's messages and docstrings advise it.
ADVICE = re.compile(r"python -m retro_jax\.([a-z0-9_.]+)((?: --[a-z_]+(?:=[^ `'\")]*)?)*)")
# Beam's own flags, which build_db hands on.
BEAM_FLAGS = {"runner", "direct_num_workers", "direct_running_mode", "project", "region",
              "temp_location", "setup_file"}


def test_every_advised_command_exists_with_its_flags(helps):
  """Each command line the package advises (errors, docstrings) names a command and flags it
  defines: advice that exits 0 doing nothing (a module that is not a command) fails here."""
  bad = []
  for path in sorted((REPO / "retro_jax").rglob("*.py")):
    for m in ADVICE.finditer(path.read_text()):
      command, flag_text = m.group(1).rstrip("."), m.group(2)
      if command not in helps:
        bad.append(f"{path.relative_to(REPO)}: python -m retro_jax.{command} is not a command")
        continue
      for flag in re.findall(r"--([a-z_]+)", flag_text):
        known = set(helps[command]) | {"help"} | (BEAM_FLAGS if command == "build_db" else set())
        if flag not in known:
          bad.append(f"{path.relative_to(REPO)}: {command} has no --{flag}")
  assert not bad, "\n".join(sorted(set(bad)))
