"""Whether a process is alive: how a leftover named after its writer's pid is told from a run
still at work (`transforms.files.staging`, `transforms.files.atomic`)."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """False only when no process `pid` exists. A pid reused by another process reads as alive,
    which keeps a leftover rather than deleting a live run's files."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
