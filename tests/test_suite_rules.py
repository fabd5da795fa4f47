"""Rules for the tests themselves, read from their source (issue 24):

* every subprocess a test starts has a timeout (subprocess.run / call / check_call / check_output
  take `timeout=`; `.wait()`, `.communicate()` and `.join()` one too), so that a hung command fails
  the suite instead of stalling it;
* no test skips itself in `make test`: pytest.skip, importorskip and the skip / skipif / xfail
  marks appear only in tests marked slow (`make test-slow`). A test that cannot run its real check
  here fails, or checks the same thing another way.
"""
import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent
RUNNERS = {"run", "call", "check_call", "check_output"}
WAITS = {"wait", "communicate", "join"}
SKIPS = {"skip", "importorskip", "skipif", "xfail"}


def sources():
  for path in sorted(TESTS.rglob("*.py")):
    if "corpus" not in path.relative_to(TESTS).parts:
      yield path, ast.parse(path.read_text(), str(path))


def has_timeout(call: ast.Call, positional: int) -> bool:
  """Whether `call` passes `timeout=` or at least `positional` positional arguments."""
  return any(k.arg == "timeout" for k in call.keywords) or len(call.args) >= positional


def test_every_subprocess_has_a_timeout():
  missing = []
  for path, tree in sources():
    for n in ast.walk(tree):
      if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
        continue
      f = n.func
      if isinstance(f.value, ast.Name) and f.value.id == "subprocess" and f.attr in RUNNERS:
        ok = has_timeout(n, positional=99)  # (a timeout is keyword-only there)
      elif f.attr in WAITS:
        ok = has_timeout(n, positional=2 if f.attr == "communicate" else 1)
      else:
        continue
      if not ok:
        missing.append(f"{path.relative_to(TESTS)}:{n.lineno}: {ast.unparse(n)[:80]}")
  assert not missing, "calls without a timeout:\n" + "\n".join(missing)


def is_slow(decorator: ast.expr) -> bool:
  return ast.unparse(decorator) == "pytest.mark.slow"


def test_no_test_of_make_test_skips():
  found = []
  for path, tree in sources():
    slow = {id(n) for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and any(is_slow(d) for d in f.decorator_list)
            for n in ast.walk(f)}
    for n in ast.walk(tree):
      if (isinstance(n, ast.Attribute) and n.attr in SKIPS and id(n) not in slow
              and ast.unparse(n).startswith("pytest.")):
        found.append(f"{path.relative_to(TESTS)}:{n.lineno}: {ast.unparse(n)}")
  assert not found, "skips outside slow tests:\n" + "\n".join(found)
