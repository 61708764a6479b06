"""How the command-line tools end on an error.

A user-facing error (a missing workdir or checkpoint, an output that exists, a refused
checkpoint file, a dataset folder that does not hold what its reader expects, a bad argument)
is printed as one line `error: <message>` on stderr and the tool exits with status 2 (the
status argparse gives a bad command line). The full traceback is printed above that line only
when asked for: with OGFR_TRACEBACK=1 in the environment (the argparse tools), or with
--verbosity=1 (tools that parse absl flags, e.g. tools.convert). Any other exception is a bug
and keeps Python's traceback and status 1.

User-facing errors are ValueError (which includes data.datasets.DatasetError,
tools.common.UsageError, pretrained.UnsafeCheckpointError) and OSError (FileNotFoundError,
FileExistsError, PermissionError, ...): the tools and the modules they call raise those with
messages that name the file or the argument at fault.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

EXIT_STATUS = 2
TRACEBACK_ENV = 'OGFR_TRACEBACK'
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def traceback_requested() -> bool:
  return os.environ.get(TRACEBACK_ENV, '').strip().lower() not in ('', '0', 'false', 'no')


def one_line(error: BaseException) -> str:
  """The message of `error` on one line (continuation lines joined with '; ')."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return '; '.join(lines) or type(error).__name__


def fail(error: BaseException, *, show_traceback: bool = False, tag: str = '') -> None:
  """Prints `error` as one 'error: ...' line (after its traceback if asked) and exits 2.

  `tag` (e.g. '[process 3]') goes after 'error: ', so that the processes of a multi-process
  run can be told apart.
  """
  if show_traceback:
    traceback.print_exception(error)
  print(f'error: {tag + " " if tag else ""}{one_line(error)}', file=sys.stderr)
  sys.exit(EXIT_STATUS)


def run_cli(main_fn: Callable[[list[str]], Any], argv: Optional[Sequence[str]] = None,
            extra_errors: tuple[type[BaseException], ...] = ()) -> None:
  """Runs a tool's `main(argv)` as a program (argv defaults to sys.argv[1:])."""
  argv = sys.argv[1:] if argv is None else list(argv)
  # The logging of ogfr_jax.main's default: library INFO logs hidden, warnings as one line.
  from ogfr_jax import console  # pylint: disable=g-import-not-at-top
  console.configure_logging(None)
  try:
    main_fn(argv)
  except USER_ERRORS + tuple(extra_errors) as e:
    fail(e, show_traceback=traceback_requested())
