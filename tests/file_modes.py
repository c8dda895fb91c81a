"""Permission bits of the files a command wrote (the umask tests). A module of its own: a
``from conftest import ...`` would find whichever conftest.py pytest imported under that name."""
import stat
from pathlib import Path


def modes_below(root) -> dict[str, int]:
    """{path relative to root: permission bits} of every file and directory below root."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in sorted(Path(root).rglob("*"))}
