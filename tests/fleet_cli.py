"""The operator's CLI, as end-to-end tests drive it: one ``tandem`` command that must succeed."""

from __future__ import annotations

import re
import subprocess

from core.launcher import tandem_argv


def run_cli(*args: str, timeout_s: float = 120.0) -> str:
    """Run ``tandem ARGS``; its stdout (a failure shows both streams)."""
    done = subprocess.run(tandem_argv(*args), capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    assert done.returncode == 0, (
        f"tandem {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def token_from(output: str, kind: str) -> str:
    """The ``join`` or ``router`` token ``tandem cloud token create`` printed."""
    match = re.search(rf"^{kind} token: (\S+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1)
