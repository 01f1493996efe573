"""The errors every layer shares. Contract modules, stages, the runner and the trainer raise these; the CLIs
turn them into one line and exit status 2."""
from __future__ import annotations


class PrxError(RuntimeError):
    """A stage (or the trainer's data) cannot run as configured; the message names the fix."""
