"""Entry point of the ``entity-runtime`` command.

Kept apart from the packages so that it can install signal handlers before the
packages (and everything they import) are loaded: a Ctrl-C or SIGTERM that
arrives while the program is still starting ends it quietly with exit code 0,
as nothing has run yet.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _stopped_while_starting(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    """Install early signal handlers, then run the command line."""
    signal.signal(signal.SIGINT, _stopped_while_starting)
    signal.signal(signal.SIGTERM, _stopped_while_starting)

    from monitoring._cli import main as run

    # The handlers stay until a command installs its own (the agent does, to
    # stop cleanly); the other commands end quietly on a signal.
    return run()


if __name__ == "__main__":
    sys.exit(main())
