"""The real NAVSIM v1.1 code as a benchmark baseline: it runs in navsim-real's own venv (../shared/tools/navsim-real),
so a bench talks to one long-lived subprocess over stdin/stdout — one "go" line a timed call, one answer line back.
Shared by bench/pdm.py (the real `pdm_score`) and bench/pdm_closed.py (the real PDM-Closed planner)."""
from __future__ import annotations

import importlib.util
import os
import subprocess

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# The fixture script knows where the tool, its python and the NAVSIM sources are (tool_paths, tool_available).
_spec = importlib.util.spec_from_file_location("navsim_real_make", os.path.join(ROOT, "tests", "fixtures",
                                                                               "navsim_real", "make_fixture.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


class Subprocess:
    """`program` (python source) run by navsim-real's python with `args`; `expect` reads a handshake line, `ask`
    sends "go" and returns the answer line's fields; `close` ends it at EOF."""

    def __init__(self, program: str, args: list[str], pythonpath: list[str] | None = None):
        tool_dir, self.python, src = tool.tool_paths()
        self.env = dict(os.environ, NAVSIM_REAL_SRC=src, PYTHONWARNINGS="ignore")
        if pythonpath:
            self.env["PYTHONPATH"] = os.pathsep.join(pythonpath + [src])
        self.proc = subprocess.Popen([self.python, "-c", program, tool_dir] + list(args), env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def expect(self, word: str) -> None:
        line = self.proc.stdout.readline().strip()
        if line != word:
            self.proc.kill()
            raise RuntimeError(f"navsim-real subprocess: expected {word!r}, got {line!r} (see its stderr)")

    def ask(self) -> list[float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        fields = [float(x) for x in self.proc.stdout.readline().split()]
        if not fields:
            raise RuntimeError("navsim-real subprocess ended (see its stderr)")
        return fields

    def close(self) -> None:
        self.proc.stdin.close()  # the subprocess ends at EOF
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
