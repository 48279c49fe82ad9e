"""One Python with Triton's CPU interpreter on, kept for a test module's kernel checks.

Triton reads TRITON_INTERPRET when its functions are defined, so interpreted kernels need a process started with it
(tests.triton_interpreter). Starting one per check costs an interpreter, torch and Triton each time; this child is
started once (the `interpreter` fixture in conftest.py: one for the whole run while it lives) and runs the checks it
is sent in order, each a module-level function of a test module called by name.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import traceback
from multiprocessing.connection import Connection
from typing import Any


class InterpreterChild:
    """A spawned Python with TRITON_INTERPRET=1 and the interpreter's fixes applied, running checks on request."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        before = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"  # the child starts with this process's environment
        try:
            self._proc = ctx.Process(target=_serve, args=(child_end,), name="triton-interpreter", daemon=True)
            self._proc.start()
        finally:
            if before is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = before
        child_end.close()

    def run(self, module: str, check: str, *args: Any, timeout_s: float = 600.0) -> None:
        """Calls module.check(*args) in the child (args are pickled). Raises AssertionError with the child's
        traceback when the check raised, or when the child died or the check ran past timeout_s (the child is
        then stopped, and later checks fail at once)."""
        assert self._proc.is_alive(), f"the interpreter child is gone (exit code {self._proc.exitcode})"
        self._conn.send((module, check, args))
        if not self._conn.poll(timeout_s):
            self.close()
            raise AssertionError(f"{module}.{check}{args} did not finish within {timeout_s:.0f} s")
        try:
            error = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise AssertionError(f"the interpreter child died in {module}.{check}{args} "
                                 f"(exit code {self._proc.exitcode})") from None
        assert error is None, f"{module}.{check}{args} failed in the interpreter child:\n{error}"

    @property
    def alive(self) -> bool:
        """Whether it still takes checks (a check that killed it, or ran past its time, ends it)."""
        return self._proc.is_alive() and not self._conn.closed

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()


def _serve(conn: Connection) -> None:
    from tests.triton_interpreter import patch_interpreter

    patch_interpreter()
    while (request := conn.recv()) is not None:
        module, check, args = request
        try:
            getattr(importlib.import_module(module), check)(*args)
        except BaseException:  # the parent turns it into the test's failure
            conn.send(traceback.format_exc())
        else:
            conn.send(None)
