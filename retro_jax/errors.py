"""User errors: what a command prints as one line (what was wrong, what to do) and exits 2 on.

Every error a user can cause (a bad flag, a database or checkpoint that does not fit, damaged data,
a held workdir, a full disk) is a `UserError`; the commands wrap their `main` in `guard`, which
prints `error: MESSAGE` to stderr, without a traceback, and exits 2. A disk that fills up
(ENOSPC / EDQUOT) is reported the same way. `RETRO_JAX_TRACEBACK=1` re-raises instead (debugging).
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable

EXIT_USER_ERROR = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class UserError(Exception):
  """A mistake or a damaged input the user can fix; the message says how."""


# How a full disk reads in a message (tensorstore, which orbax writes through, reports ENOSPC,
# EDQUOT and EFBIG as a ValueError with the code in its text).
DISK_FULL_TEXT = ("No space left on device", "os_error_code='28'", "Disk quota exceeded",
                  "os_error_code='122'", "File too large", "os_error_code='27'")


def is_disk_full(e: BaseException) -> bool:
  """Whether `e`, or an exception it was raised from, is a full disk (ENOSPC, EDQUOT, EFBIG)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in DISK_FULL:
      return True
    if any(m in str(e) for m in DISK_FULL_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def guard(main: Callable) -> Callable:
  """`app.run(errors.guard(main))`: user errors become one line on stderr and exit code 2."""
  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except (UserError, OSError) as e:
      if os.environ.get("RETRO_JAX_TRACEBACK") or (
          isinstance(e, OSError) and not isinstance(e, UserError) and not is_disk_full(e)):
        raise
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(EXIT_USER_ERROR)
  return wrapped
