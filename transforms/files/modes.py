"""File modes that respect the umask.

``open()`` creates a file with mode ``0o666 & ~umask``, but safetensors (and anything that
writes through a temporary file from ``tempfile.mkstemp``) creates it 0600, whatever the umask:
model weights would be private while the config beside them is not, and a team could not share
a model directory. :func:`respect_umask` gives every file of a directory capfilt has just
written the mode ``open()`` would have given it.

The umask is read from ``/proc/self/status`` where there is one: setting it to read it back
(``os.umask``) would change it for every thread of the process in between.
"""
from __future__ import annotations

import os
import stat


def umask() -> int:
    """This process's umask."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, then put it back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits ``open()`` gives a new file under the current umask."""
    return 0o666 & ~umask()


def respect_umask(root: str | os.PathLike) -> None:
    """Give ``root`` (a file) or every regular file below it (a directory) the mode of
    :func:`file_mode`. Symlinks and what they point at are left alone."""
    mode = file_mode()
    root = os.fspath(root)
    if os.path.islink(root):
        return
    if not os.path.isdir(root):
        paths = [root]
    else:
        paths = [os.path.join(folder, name) for folder, _dirs, names in os.walk(root) for name in names]
    for path in paths:
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) != mode:
            os.chmod(path, mode)
