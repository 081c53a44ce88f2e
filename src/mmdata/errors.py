"""The one exception hierarchy: every failure a user can cause ends here, with a message that names the fix."""

from __future__ import annotations


class MmdataError(Exception):
    """Base class. The CLI prints ``str(error)`` on one line and exits with ``exit_code``."""

    exit_code = 1


class RecipeError(MmdataError):
    """A recipe is malformed: unknown key, wrong type, missing file, impossible combination."""

    exit_code = 2


class SourceError(MmdataError):
    """A source cannot be opened or read (missing file, unreachable hub, gated dataset)."""

    exit_code = 3


class SampleError(MmdataError):
    """One record cannot be written; the pipeline turns it into a reject (never a crash, never a silent drop).

    ``kind`` is the short reason the build summary counts by (default: the message up to its first ``:`` or ``(``).
    """

    def __init__(self, message: str, kind: str | None = None):
        from .samples import utf8_text  # a message quoting row data may hold half a UTF-16 pair: print- and writable

        message = utf8_text(message)
        super().__init__(message)
        self.kind = utf8_text(kind or message.split(":")[0].split("(")[0].strip()[:80])


class BuildError(MmdataError):
    """A build cannot proceed or finished with rejects under ``--strict``."""

    exit_code = 4


class DatasetInfoError(MmdataError):
    """``dataset_info.json`` cannot be read, or an entry would be replaced without ``--overwrite``."""

    exit_code = 5


class BuildWarning(UserWarning):
    """A build finished but deserves a look: nothing written, or a large share of its rows rejected."""
