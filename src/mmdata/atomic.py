"""The one way mmdata replaces a file: write a temporary file beside it, fsync, rename it over the target.

A reader (LLaMA-Factory, a resumed build, a second process) sees the old file or the new one, never half of one, and
a kill leaves at most a hidden ``.<name>.*.tmp`` that the next build of that folder removes. The replacement keeps
the mode of the file it replaces (a shared ``dataset_info.json`` stays group-readable); a new file gets the umask's.
Images are the exception, stored by :func:`mmdata.task._store_image` without fsync (that would halve the write rate;
a task redone after a crash rewrites them).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .samples import utf8_text


@contextlib.contextmanager
def replaced_on_close(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file to write (``"w"``: UTF-8 text, ``"wb"``: bytes) that replaces ``path`` when the block ends without an
    exception; on an exception the temporary file is removed and ``path`` is untouched."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            keep = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            keep = 0o666 & ~_umask()
        os.fchmod(fd, keep)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``. Text UTF-8 cannot carry (lone surrogates, e.g. from a recipe's ``"\\ud83d"``
    or a reject reason quoting row data) is written with U+FFFD in their place (:func:`mmdata.samples.utf8_text`)
    instead of failing once the work is done."""
    with replaced_on_close(path) as f:
        f.write(utf8_text(text))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
