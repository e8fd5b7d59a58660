"""Atomic file writes: data goes to `.NAME.PID.partial` beside the destination and is renamed onto it
only when complete, so readers never see half a file.

A writer killed outright (SIGKILL, power loss) cannot remove its partial; the PID in the name lets the
next write into the same folder tell such leftovers from the partials of writers still running.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "remove_stale_partials"]

# At most 9 digits: every Linux/macOS PID fits, and os.kill never overflows on a made-up name.
_PARTIAL = re.compile(r"\..+\.([1-9][0-9]{0,8})\.partial")


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: delivers nothing, only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's live process; anything else: not ours to judge
        return False
    return False


def remove_stale_partials(folder: str | os.PathLike) -> None:
    """Remove `.NAME.PID.partial` files in `folder` whose writing process no longer runs."""
    try:
        for entry in os.scandir(folder):
            m = _PARTIAL.fullmatch(entry.name)
            if m and entry.is_file(follow_symlinks=False) and _dead(int(m.group(1))):
                Path(entry.path).unlink(missing_ok=True)  # another run may be removing it too
    except OSError:  # best effort: an unlistable folder is for the write itself to report
        pass


@contextmanager
def atomic_write(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield the partial path to write; on success it replaces `dst`, on any exception (Ctrl-C included)
    it is removed. Dead writers' partials in `dst`'s folder are removed first."""
    dst = Path(dst)
    remove_stale_partials(dst.parent)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
