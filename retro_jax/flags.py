"""The flags the commands share: one name, one type, one default for one meaning.

A command defines a shared flag with `define(name)`; only whether it is required and a note on what
this command does with it differ between commands (tests/test_flags.py runs every command's --help
against SHARED). The vocabulary, as WORKSPACE.md names the paths:

  --db              a retrieval database (build_db writes one; the rest read it; default: the one
                    the model or experiment names)
  --workdir         a model directory (checkpoints, metrics, logs)
  --config          an experiment file (experiments/*.py), fields overridden by --config.FIELD=VALUE
  --step            a checkpoint step (default: the latest)
  --size            a model size of retro_jax.model.config.SIZES
  --num_neighbours  neighbours per chunk (default: the model's; build_db: build.settings.DEFAULTS)
  --retrieval       retrieval modes, a list (on, off, shuffled, ...; all: the command's usual set)
  --backend         an index backend under DB/index/ (default: the one built)
  --service         host:port of every retrieval shard server (retro_jax.retrieval.serve)
  --mesh            the device mesh (data, fsdp, model) evaluate and sample run on, as an
                    experiment's `mesh` (`mesh_from_flag`; default: all devices data-parallel)
  --embed_batch_size, --max_docs

`--out` (any other results file or directory) is a name every command uses too, but what it
writes, and so its default, is each command's own. Old spellings (`--k`, `--sweep`,
`--retrieval_service`, and aot_compile's model flags, now experiment fields) stop with an error that
names the new flag (`renamed`).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

from retro_jax import errors
from retro_jax.build.settings import DEFAULTS as BUILD_DEFAULTS
from retro_jax.evaluation.modes import MODES
from retro_jax.model.config import SIZES
from retro_jax.model.partitioning import make_mesh
from retro_jax.retrieval.backends import ALL_BACKENDS

# Flags defined below belong to the command that calls `define` (its --help lists them), not to
# this module.
flags.disclaim_key_flags()


@dataclasses.dataclass(frozen=True)
class Shared:
  kind: str  # string | integer | float | list | enum | config
  default: Any
  help: str
  choices: tuple[str, ...] = ()


SHARED: dict[str, Shared] = {
    "db": Shared("string", None, "retrieval database directory (local or gs://)"),
    "workdir": Shared("string", None, "model directory (local or gs://): checkpoints, metrics, "
                      "config, logs"),
    "config": Shared("config", None, "experiment file (experiments/*.py); a field is overridden "
                     "with --config.FIELD=VALUE"),
    "step": Shared("integer", None, "checkpoint step (default: the latest)"),
    "size": Shared("enum", None, "model size (retro_jax.model.config.SIZES)", tuple(sorted(SIZES))),
    "num_neighbours": Shared("integer", None, "neighbours per chunk"),
    "retrieval": Shared("list", ["all"], "retrieval modes: all (the command's usual set), both "
                        f"(= on,off), controls (all five), or some of {', '.join(MODES)}"),
    "backend": Shared("enum", None, "index backend under DB/index/", tuple(ALL_BACKENDS)),
    "service": Shared("list", None, "host:port of every retrieval shard server "
                      "(retro_jax.retrieval.serve)"),
    "service_timeout_s": Shared("float", 10.0, "deadline of connecting to the retrieval service "
                                "and of each of its searches (seconds)"),
    "mesh": Shared("list", ["-1", "1", "1"], "device mesh data,fsdp,model (one -1 takes the "
                   "remaining devices), as an experiment's mesh: the weights in the training "
                   "layout, the batch over data and fsdp"),
    "embed_batch_size": Shared("integer", BUILD_DEFAULTS["embed_batch_size"],
                               "embedder rows per forward call"),
    "max_docs": Shared("integer", None, "keep only the first N documents (smoke runs)"),
}

# Old spelling -> the shared flag that replaced it.
RENAMED: dict[str, str] = {"k": "num_neighbours", "sweep": "config", "retrieval_service": "service"}


def define(name: str, *, required: bool = False, note: str = "") -> None:
  """Defines the shared flag `name` for the calling command; `note` says what it does with it."""
  s = SHARED[name]
  text = f"{s.help}; {note}" if note else s.help
  if s.kind == "config":
    config_flags.DEFINE_config_file(name, s.default, text, lock_config=False)
    if required:
      flags.mark_flag_as_required(name)
  elif s.kind == "enum":
    flags.DEFINE_enum(name, s.default, list(s.choices), text, required=required)
  else:
    define_fn = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
                 "float": flags.DEFINE_float, "list": flags.DEFINE_list}[s.kind]
    define_fn(name, s.default, text, required=required)


class MeshError(errors.UserError, ValueError):
  """A --mesh that is not three integers, or does not fit the devices."""


def mesh_from_flag(value, devices=None):
  """The ("data", "fsdp", "model") Mesh that --mesh (three integers, one may be -1) names, over
  `devices` (default: all); partitioning.make_mesh, as training builds it."""
  text = ",".join(str(v) for v in value)
  try:
    shape = tuple(int(v) for v in value)
  except ValueError:
    shape = ()
  if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise MeshError(f"--mesh={text}: expected three integers data,fsdp,model, at most one -1 "
                    "(the remaining devices), e.g. -1,1,1 (data-parallel) or 1,-1,1 (FSDP)")
  try:
    return make_mesh(shape, devices)
  except ValueError as e:
    raise MeshError(f"--mesh={text}: {e}") from None


def renamed(old: str, how: str = "", boolean: bool = False) -> None:
  """Defines `--old` only to stop with an error naming what replaced it: the shared flag
  RENAMED[old], or `how`. `boolean`: the old flag was a boolean (--old, --noold)."""
  replacement = how or f"use --{RENAMED[old]}"
  define_fn = flags.DEFINE_boolean if boolean else flags.DEFINE_string
  define_fn(old, None, f"removed: {replacement}")
  flags.register_validator(old, lambda v: v is None, message=f"--{old} was removed: {replacement}")


def _flag_error(e: flags.Error) -> None:
  """A flag absl cannot parse (unknown, removed, or a value of the wrong type such as
  `--config.seq_len=abc`): one line, exit 2, as for every other user error."""
  detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
  sys.stderr.write(f"error: {detail} (--helpshort lists the flags)\n")
  sys.exit(errors.EXIT_USER_ERROR)


def parse(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's flags_parser) where an experiment file that is missing, does
  not load, or lacks a field a `--config.FIELD` override names stops with one line, exit 2 (not
  ml_collections' traceback); so does any other flag absl refuses."""
  try:
    rest = flags.FLAGS(argv)
    for name, s in SHARED.items():  # ml_collections defers a file's load error to first use
      if s.kind == "config" and name in flags.FLAGS and flags.FLAGS[name].value is not None:
        flags.FLAGS[name].value.keys()
    return rest
  except flags.Error as e:
    _flag_error(e)
  except (OSError, AttributeError, KeyError, TypeError, ValueError, SyntaxError,
          ImportError) as e:
    given = [a for a in argv[1:] if a.startswith("--config")]
    named = [a for a in given if a.startswith("--config.") and
             a[len("--config."):].split("=")[0].split(".")[-1] in str(e)]
    given = " ".join((named or given)[:3]) or "--config"
    detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:400]
    sys.stderr.write(f"error: {given}: the experiment file or an override does not fit "
                     f"({type(e).__name__}: {detail}); check the file's path and the field "
                     "names (experiments/*.py)\n")
    sys.exit(errors.EXIT_USER_ERROR)


def parse_known_only(argv: list[str]) -> list[str]:
  """absl's flag parsing for a command that hands the flags it does not define on (build_db: to
  Beam); a bad flag of its own stops with one line, exit 2, not a traceback."""
  try:
    return flags.FLAGS(argv, known_only=True)
  except flags.Error as e:
    _flag_error(e)
