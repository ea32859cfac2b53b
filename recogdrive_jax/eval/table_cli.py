"""What the table commands of `eval/` (`evidence`, `nav_compare`) share: their `NAME=DIR[,DIR...]` arguments and
their tail — print the table, also write it to `--out` when given, or one `error:` line and exit 2 on a bad input.
Each caller keeps its own usage text and error types, so its messages stay its own."""
from __future__ import annotations

import sys
from collections.abc import Callable


def parse_named_dirs(arg: str, usage: str, error: type[Exception] = ValueError) -> tuple[str, list[str]]:
    """'NAME=A,B' → ('NAME', ['A', 'B']) (name stripped, empty paths dropped). Raises `error`("expected <usage>,
    got '<arg>'") when the '=', the name or every path is missing."""
    name, sep, paths = arg.partition("=")
    dirs = [p for p in paths.split(",") if p]
    if not sep or not name.strip() or not dirs:
        raise error(f"expected {usage}, got {arg!r}")
    return name.strip(), dirs


def print_table(make_table: Callable[[], str], out: str, errors: tuple[type[Exception], ...]) -> int:
    """Exit status of a table command: 0 after printing `make_table()` (and writing it to `out` when set); 2 after
    one `error: ...` line on stderr when it raises one of `errors` (the caller's user-input errors; others
    propagate)."""
    try:
        text = make_table()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if out:
        with open(out, "w") as f:
            f.write(text)
    return 0
