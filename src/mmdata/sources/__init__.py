"""Source adapters: one small module per input shape, registered by ``type:`` name.

A source only *reads*: it yields raw rows (plain dicts) in a deterministic order. Turning a row into a conversation is
the normaliser's job (``mmdata.normalize``), driven by the recipe's ``fields``/``prompt``. Third-party packages add
sources through the entry-point group ``mmdata.sources`` (``name = "package.module:SourceClass"``).
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..errors import RecipeError, SampleError, SourceError

_REGISTRY: dict[str, type[Source]] = {}
class SourceParams(BaseModel):
    """Base for a source's parameters: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")

    allowed_roots: list[str] = Field(
        [], description="extra folders that image paths in records may point into (besides the source's own folder)"
    )


class Source:
    """Base class. Subclasses set ``Params`` and implement :meth:`rows`; the rest has sensible defaults."""

    Params: ClassVar[type[SourceParams]] = SourceParams

    def __init__(self, params: SourceParams, base_dir: Path):
        self.params = params
        self.base_dir = base_dir

    def rows(self) -> Iterator[dict[str, Any]]:
        """Yield raw rows in a fixed order (the same order on every run and every machine)."""
        raise NotImplementedError

    def num_rows(self) -> int | None:
        """Row count when cheap to know (needed for seeded splits); ``None`` if unknown (e.g. streaming)."""
        return None

    #: True when :meth:`read_rows` is cheap (no reading of earlier rows). The build then hands workers row ranges
    #: instead of rows: the main process reads nothing, and ``--shard``/resume never touch skipped rows.
    random_access: ClassVar[bool] = False

    def read_rows(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Rows ``[start, stop)`` in :meth:`rows` order. Sources with cheap random access override this."""
        import itertools

        return itertools.islice(self.rows(), start, stop)

    @property
    def image_root(self) -> Path:
        """Folder that relative image paths in rows are resolved against."""
        return self.base_dir

    @property
    def allowed_roots(self) -> list[Path]:
        """Folders a record's image path may resolve into: :attr:`image_root` plus ``source.allowed_roots``."""
        return [self.image_root, *(self.resolve(r) for r in getattr(self.params, "allowed_roots", None) or [])]

    def fingerprint(self) -> str:
        """Changes whenever the input changes; used to decide whether a rebuild is needed."""
        return hashlib.sha256(self.params.model_dump_json().encode()).hexdigest()

    def skipped(self, rows_yielded: int | None = None) -> dict[str, int]:
        """Source rows dropped on purpose before a row was yielded, by reason (``{"where": 3}``).

        The build adds these to its accounting (``read == written + rejected + skipped``): a row a source filters
        out (``where:``) is neither written nor rejected, yet it was read. ``rows_yielded`` is how many rows the
        build took from :meth:`rows` (``max_samples``); ``None`` means all of them. Most sources drop nothing.
        """
        return {}

    def refresh(self) -> None:
        """Forget any cached copy of the input, so the next read sees the files as they are now (``rebuild``)."""

    def resolve(self, path: str | os.PathLike) -> Path:
        """A parameter path made absolute against the recipe's folder."""
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else (self.base_dir / p)

    def discovered(self, path: Path, folder: Path, what: str) -> Path:
        """A file the source *found* (not one the recipe named) made real, if it lies in ``folder`` or
        ``source.allowed_roots``; otherwise a :class:`SourceError` naming it and the way to allow it.

        The recipe's own ``path`` is trusted; what is discovered inside it (metadata, a folder's JSON files, image
        shards) is data, and a symlink in data must not make the build read ``/home/me/.ssh`` into a dataset.
        """
        from ..normalize import contained_path

        roots = [folder, *(self.resolve(r) for r in getattr(self.params, "allowed_roots", None) or [])]
        try:
            return contained_path(path, roots, what=what)
        except SampleError as e:
            raise SourceError(str(e)) from None


def files_fingerprint(paths: list[Path]) -> str:
    """Cheap content fingerprint of input files: name, size and modification time of each."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def register_source(name: str) -> Callable[[type[Source]], type[Source]]:
    """Class decorator: ``@register_source("csv")`` makes ``source: {type: csv}`` use the class."""

    def decorate(cls: type[Source]) -> type[Source]:
        _REGISTRY[name] = cls
        cls.type_name = name
        return cls

    return decorate


def _load_builtins() -> None:
    """Import every module of this package once: each registers its sources with ``@register_source``, so a new
    built-in adapter is one new file and no list to keep in step (importing one directly registers only that one)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def get_source_class(name: str) -> type[Source]:
    """Look a source type up: built-ins first, then the ``mmdata.sources`` entry points."""
    _load_builtins()
    if name not in _REGISTRY:
        for ep in entry_points(group="mmdata.sources"):
            if ep.name == name:
                cls = ep.load()
                _REGISTRY.setdefault(name, cls)
                break
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group="mmdata.sources")})
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"unknown source type {name!r}: {hint}known types are {', '.join(known)}")
    return _REGISTRY[name]


def open_source(source_type: str, params: dict[str, Any], base_dir: str | os.PathLike) -> Source:
    cls = get_source_class(source_type)
    return cls(cls.Params.model_validate(params), Path(base_dir))


def source_types() -> list[str]:
    _load_builtins()
    return sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group="mmdata.sources")})
