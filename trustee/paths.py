"""Where runs go when no directory is named: `runs/<name>` under the working directory, or under
`$TRUSTEE_RUNS_DIR` when it is set (the test suite sets it, so no test ever reads or writes a
user's own `runs/`). Callers: `trustee.run` (the default run directory) and `trustee.eval` (the
default report path). It owns nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

RUNS_ENV = "TRUSTEE_RUNS_DIR"


def runs_root() -> Path:
    """The directory that holds default run directories."""
    return Path(os.environ.get(RUNS_ENV) or "runs")


def default_run_dir(name: str) -> Path:
    """`runs/<name>` (or `$TRUSTEE_RUNS_DIR/<name>`)."""
    return runs_root() / name
