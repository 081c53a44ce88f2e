"""The output folder of a build: where every file goes, what the build owns there, and how it is claimed.

Records spell image paths relative to the folder of ``dataset_info.json``. Only what a build writes is its own: the
split files, ``images/``, ``rejects.jsonl``, the manifest ``mmdata_build.json`` and the state folder ``.mmdata/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .atomic import write_text_atomic
from .errors import BuildError, MmdataError
from .recipes import Recipe
from .sources import Source
from .writers.llamafactory import unregister_datasets

MANIFEST = "mmdata_build.json"
STATE_DIR = ".mmdata"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    """Where every file of a build goes. Paths in records are relative to the folder of ``dataset_info.json``."""

    root: Path
    name: str
    file_format: str
    split_enabled: bool
    dataset_info: Path

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> Layout:
        root = Path(recipe.output.dir).expanduser().resolve()
        info = Path(recipe.output.dataset_info).expanduser().resolve() if recipe.output.dataset_info else root / "dataset_info.json"
        return cls(root, recipe.dataset_name, recipe.output.file_format, recipe.split.enabled, info)

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @cached_property  # read for every record
    def media_prefix(self) -> str:
        """Relative path from the dataset_info folder to the output folder ('' when they are the same)."""
        rel = os.path.relpath(self.root, self.dataset_info.parent)
        return "" if rel == "." else rel.replace(os.sep, "/") + "/"

    def dataset_name(self, split: str) -> str:
        return f"{self.name}_{split}" if self.split_enabled else self.name

    def data_path(self, split: str) -> Path:
        """The ``file_name`` target: a shard folder (jsonl) or one JSON array file (json)."""
        base = self.root / self.dataset_name(split)
        return base if self.file_format == "jsonl" else base.with_suffix(".json")

    def part(self, task: int) -> Path:
        """A task's staged records, in input order, before finalising routes them into splits."""
        return self.state / "parts" / f"part-{task:05d}.jsonl"

    def rejects_part(self, task: int) -> Path:
        return self.state / "rejects" / f"part-{task:05d}.jsonl"

    def split_labels(self, task: int) -> Path:
        """With ``split.from_source``: the split of each staged record of a task, one per line."""
        return self.state / "splits" / f"part-{task:05d}.txt"

    def marker(self, task: int) -> Path:
        return self.state / "done" / f"task-{task:05d}.json"

    def image(self, digest: str, extension: str) -> Path:
        return self.root / self.image_rel(digest, extension)

    @staticmethod
    def image_rel(digest: str, extension: str) -> str:
        """An image's path relative to the output folder, as records spell it (after ``media_prefix``).

        Content-addressed: an image that several records share (SLAKE: ~640 images under ~14k questions) is stored
        once, and the name depends on the bytes alone, so any number of workers writes the same tree."""
        return f"images/{digest[:2]}/{digest}.{extension}"

    def owned_paths(self) -> list[Path]:
        """Everything a build of this layout may create at the top of its folder: recorded in its state before any
        of it is written, it is all a later build may remove or replace."""
        return [*(self.data_path(s) for s in (SPLITS if self.split_enabled else SPLITS[:1])), self.root / "images",
                self.root / "rejects.jsonl", self.root / "fingerprints.npz", self.root / MANIFEST, self.state]


def read_manifest(build_dir: str | os.PathLike, error: type[MmdataError] = BuildError) -> dict:
    """The manifest of the finished build in ``build_dir`` (the one reader every command uses); ``error`` (the
    caller's exception class) says what is wrong: no manifest, not JSON, or only a ``--shard`` part."""
    root = Path(build_dir).expanduser().resolve()
    if root.is_file():
        raise error(f"{root} is a file; pass the build folder (the output.dir that holds {MANIFEST})")
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{root}: no {MANIFEST}; pass the output.dir of a finished `mmdata build`") from None
    except (OSError, ValueError) as e:
        raise error(f"{root / MANIFEST}: cannot be read ({e}); rebuild to rewrite it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), dict):
        raise error(f"{root / MANIFEST}: not a build manifest; rebuild to rewrite it")
    if manifest.get("shard", [0, 1]) != [0, 1]:
        raise error(f"{root} holds shard {manifest['shard']} only; run `mmdata merge` first")
    return manifest


def manifest_dataset_info(build_dir: str | os.PathLike, manifest: dict) -> Path:
    """The ``dataset_info.json`` a build registered its datasets in (``output.dataset_info`` may put it elsewhere)."""
    return (Path(build_dir).expanduser().resolve() / manifest.get("dataset_info", "dataset_info.json")).resolve()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def input_paths(recipe: Recipe, source: Source) -> tuple[list[Path], list[Path]]:
    """Local paths the build reads: ``(read, scanned)``.

    ``read``: every existing path a ``path``/``image_root``/``data_dir``/``data_files``/``allowed_roots`` value of the
    recipe's source names (nested mixture sources included, so plug-in sources need no code), plus the source's
    image root and allowed roots. ``scanned``: the folders among them that a source walks (a folder ``path``, an
    explicit ``image_root``): an output folder inside one of those would be read back by the next build.
    """
    read, scanned = [Path(source.image_root), *map(Path, source.allowed_roots)], []

    def visit(node, key: str | None = None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, k)
        elif isinstance(node, list):
            for v in node:
                visit(v, key)
        elif isinstance(node, str) and key in _PATH_KEYS and node:
            path = source.resolve(node)
            if path.exists():
                read.append(path)
                if key in ("path", "image_root", "data_dir") and path.is_dir():
                    scanned.append(path)

    visit(recipe.source.params())
    return [Path(os.path.realpath(p)) for p in read], [Path(os.path.realpath(p)) for p in scanned]


_PATH_KEYS = {"path", "image_root", "data_dir", "data_files", "allowed_roots"}


def refuse_overlap(layout: Layout, read: list[Path], scanned: list[Path]) -> None:
    """An output folder that is, or holds, something the build reads -- or lies inside a folder a source walks -- is
    refused before anything is written: a rebuild there would replace or delete the user's input."""
    root = Path(os.path.realpath(layout.root))
    for path in read:
        if path == root or path.is_relative_to(root):
            what = "is" if path == root else "contains"
            raise BuildError(
                f"output.dir {root} {what} the source's input {path}: a build there could replace or delete it. "
                "Choose an output.dir outside the source's folders (set output.dataset_info to register the "
                "datasets in an existing dataset_info.json)")
    for folder in scanned:
        if root.is_relative_to(folder):
            raise BuildError(
                f"output.dir {root} lies inside {folder}, which the source reads: the next build would read its own "
                "output back. Choose an output.dir outside that folder")


class OutputLock:
    """Claims on an output folder, so that two builds never write into one folder at cross purposes.

    The folder itself is locked exclusively while a build claims it (``with OutputLock(layout, shard)``: claims never
    interleave). A build that finds another one running there is refused at once, without waiting. Once claimed
    (:meth:`claimed`), a whole build (and ``mmdata merge``) holds its state folder ``.mmdata/`` exclusively: it runs
    alone. ``--shard I/N`` parts of one recipe built into one folder hold it shared and run side by side, each part
    also holding ``.mmdata/running/shard-I-of-N.lock`` exclusively, so the same part never runs twice at once. A build
    that would replace another's files must first take the state folder exclusively (:meth:`take_over`). No lock file
    is left in the user's folder (the running locks live in the state folder).
    """

    def __init__(self, layout: Layout, shard: tuple[int, int] = (0, 1)):
        self.layout = layout
        self.shard = shard
        self._folder: int | None = None
        self._held: list[int] = []
        self._created = False

    @property
    def _running_file(self) -> Path:
        index, count = self.shard
        return self.layout.state / "running" / f"shard-{index}-of-{count}.lock"

    def __enter__(self) -> OutputLock:
        root = self.layout.root
        blocking = next((p for p in [root, *root.parents] if p.exists() or p.is_symlink()), None)
        if blocking is not None and not blocking.is_dir():
            raise BuildError(f"output.dir {root}: {blocking} is a file, not a folder; choose another output.dir")
        self._created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        self._folder = os.open(self.layout.root, os.O_RDONLY)
        fcntl.flock(self._folder, fcntl.LOCK_EX)
        try:
            self._refuse_if_running()
        except BaseException as err:
            self.__exit__(type(err))
            raise
        return self

    def _refuse_if_running(self) -> None:
        """Two builds at once in one folder are refused unless both are distinct ``--shard`` parts."""
        whole = self.shard[1] == 1
        busy = not _try_lock(self.layout.state, fcntl.LOCK_EX if whole else fcntl.LOCK_SH)
        if not busy and not whole and self._running_file.is_file():
            busy = not _try_lock(self._running_file, fcntl.LOCK_EX)
        if busy:
            self._refuse()

    def take_over(self) -> None:
        """Call before removing another build's files: refuses while a build still runs in the folder."""
        if not self.alone():
            self._refuse()

    def _refuse(self) -> None:
        raise BuildError(f"another build is writing into {self.layout.root} right now; wait for it to finish, "
                         "or choose another output.dir")

    def alone(self) -> bool:
        """No other build runs in the folder now (none can start meanwhile: this one holds the claim)."""
        return _try_lock(self.layout.state, fcntl.LOCK_EX)

    def claimed(self) -> None:
        """The claim is done: hold the state folder as a running build and let other builds claim."""
        whole = self.shard[1] == 1
        self._held.append(_hold(self.layout.state, fcntl.LOCK_EX if whole else fcntl.LOCK_SH))
        if not whole:
            self._running_file.parent.mkdir(exist_ok=True)
            self._held.append(_hold(self._running_file, fcntl.LOCK_EX))
        fcntl.flock(self._folder, fcntl.LOCK_UN)

    def __exit__(self, exc_type, *_) -> None:
        for fd in [*self._held, self._folder]:
            if fd is not None:
                os.close(fd)
        self._held, self._folder = [], None
        if exc_type is not None and self._created:  # a refused first build leaves no empty folder behind
            with contextlib.suppress(OSError):
                self.layout.root.rmdir()


def _open_for_lock(path: Path) -> int:
    """A descriptor to ``flock``: a folder read-only, a lock file read-write (NFS emulates ``flock`` with byte-range
    locks, and an exclusive one needs a file open for writing)."""
    if path.is_dir():
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _hold(path: Path, mode: int) -> int:
    """An open descriptor of ``path`` locked with ``mode`` (never waits: the caller holds the folder's claim)."""
    fd = _open_for_lock(path)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BuildError(f"{path} is locked by another build; wait for it to finish") from None
    return fd


def _try_lock(path: Path, mode: int) -> bool:
    """Whether ``path`` (a state folder or a running lock) could be locked with ``mode`` now; a missing path can."""
    if path.is_symlink() or not (path.is_dir() or path.is_file()):  # missing, or a FIFO that an open would block on
        return True
    fd = _open_for_lock(path)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the test lock


def claim_output(layout: Layout, recipe: Recipe, fingerprint: str, rebuild: bool, lock: OutputLock,
                 beside: Iterable[Path] = ()) -> None:
    """Make ``layout.root`` this build's: keep finished tasks of the same fingerprint, clear a stale build's files.

    Only what the state says an earlier build wrote is ever removed or replaced. A folder that holds files of its own
    and no mmdata build is refused unless ``output.allow_existing``; even then a path this build would write that
    already exists (and is not its own) is refused, never replaced. ``lock.take_over`` is called before anything of
    another build is removed (it refuses while that build still runs); a killed run's temporaries are cleared only
    while no other build runs (they may be a running ``--shard`` part's). ``beside``: folders that may stand in the
    output folder without making it foreign (``mmdata merge`` into the folder that holds the parts).
    """
    _refuse_foreign_state(layout)
    state = read_json(layout.state / "state.json")
    manifest = read_json(layout.root / MANIFEST)
    previous = state or _state_from_manifest(manifest)  # a build whose state.json a kill removed: its manifest says
    if previous and previous.get("name") != recipe.dataset_name and not recipe.output.overwrite:
        raise BuildError(
            f"{layout.root} holds the build {previous.get('name')!r}; choose another output.dir, or pass --overwrite "
            "to replace it"
        )
    owned = _owned(layout, previous)
    planned = layout.owned_paths()
    if not previous:
        allowed = {*planned, *beside}
        foreign = sorted(p.name for p in layout.root.iterdir() if p.name not in _SHARED_NAMES
                         and not p.name.startswith((f".{layout.dataset_info.name}.", ".dataset_info.json."))
                         and p not in allowed)
        if foreign and not recipe.output.allow_existing:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise BuildError(
                f"{layout.root} is not empty ({shown}) and holds no mmdata build; choose a new or empty output.dir, "
                "or set output.allow_existing: true (--allow-existing) to write beside those files (mmdata never "
                "deletes or replaces a file it did not write)")
    clashes = [p for p in planned if p not in owned and p != layout.state and (p.exists() or p.is_symlink())]
    if clashes:
        raise BuildError(
            f"{clashes[0]} already exists and was not written by mmdata: a build never replaces it. Move it, or "
            "choose another output.dir (or output.name)")
    if previous and (not state or previous.get("fingerprint") != fingerprint or rebuild):
        lock.take_over()
        # Unregister the stale build first: its dataset_info entries must never point at files being rebuilt.
        if manifest and manifest.get("datasets") and manifest.get("dataset_info"):
            unregister_datasets((layout.root / manifest["dataset_info"]).resolve(),
                                {name: d.get("file_name") for name, d in manifest["datasets"].items()})
        for path in owned:
            if path != layout.state:
                _remove(path)
        _clear_state(layout)
    elif not state and layout.state.exists():
        # Task markers without a state.json are a stale build's (a kill while it was cleared): resuming from them
        # would mix two recipes' output.
        lock.take_over()
        _clear_state(layout)
    # Leftovers of a killed run: the temporary names of this build's own top-level files (never other ``*.tmp``
    # files of the folder, which may be the user's) and anything in the state folder. Image temporaries carry their
    # task's number and are replaced when the task is redone.
    alone = lock.alone()
    for path in planned if alone else ():
        for tmp in itertools.chain([path.with_name(path.name + ".tmp")], path.parent.glob(f".{path.name}.*.tmp")):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            elif tmp.exists() or tmp.is_symlink():
                tmp.unlink()
    for tmp in layout.state.rglob("*.tmp") if layout.state.exists() and alone else []:
        tmp.unlink()
    write_state(layout, fingerprint)


# What a build writes inside its state folder (``.mmdata/``), besides the temporaries of atomic writes.
_STATE_ENTRIES = {"state.json", "skipped.json", "dedup-rejects.jsonl", "done", "parts", "rejects", "splits",
                  "fingerprints", "running"}


def _refuse_foreign_state(layout: Layout) -> None:
    """A ``.mmdata`` that is not a folder of mmdata's own (a link, a file, or a folder holding other names) is the
    user's: a build that cleared it would delete what it holds, or follow the link out of the output folder."""
    path = layout.state
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_dir():
        what = "a link" if path.is_symlink() else "a file"
        raise BuildError(f"{path} is {what}, not mmdata's state folder: a build never replaces it. Move it, or "
                         "choose another output.dir")
    other = sorted(p.name for p in path.iterdir() if p.name not in _STATE_ENTRIES
                   and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    if other:
        raise BuildError(f"{path} holds {', '.join(other[:5])}, which mmdata does not write there: a build never "
                         "deletes it. Move it, or choose another output.dir")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clear_state(layout: Layout) -> None:
    """Remove the state folder with ``state.json`` last, so a kill midway leaves a state that still says which
    files were that build's (or no task markers at all)."""
    if not layout.state.exists():
        return
    for path in layout.state.iterdir():
        if path.name != "state.json":
            _remove(path)
    _remove(layout.state)


def _state_from_manifest(manifest: dict | None) -> dict | None:
    """What a manifest says of the build that wrote it: its dataset name and the files it registered."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("recipe"), dict) or "fingerprint" not in manifest:
        return None
    output = manifest["recipe"].get("output") or {}
    datasets = manifest.get("datasets") or {}
    root_rel = os.path.dirname(manifest.get("dataset_info") or "dataset_info.json")
    files = [os.path.normpath(os.path.join(root_rel, d["file_name"])) for d in datasets.values()
             if isinstance(d, dict) and isinstance(d.get("file_name"), str)]
    return {"name": output.get("name") or manifest["recipe"].get("name"), "fingerprint": manifest["fingerprint"],
            "owned": [*files, "images", "rejects.jsonl", "fingerprints.npz", MANIFEST, STATE_DIR]}


def write_state(layout: Layout, fingerprint: str) -> None:
    """``.mmdata/state.json``: which build this folder holds and every top-level path it may write (its own)."""
    layout.state.mkdir(parents=True, exist_ok=True)
    write_text_atomic(layout.state / "state.json", json.dumps({
        "name": layout.name, "fingerprint": fingerprint, "file_format": layout.file_format,
        "split_enabled": layout.split_enabled,
        "owned": sorted(os.path.relpath(p, layout.root) for p in layout.owned_paths())}))


def keep_only_written(layout: Layout) -> None:
    """After a finished build: narrow ``state.json``'s owned paths to those that exist. A claim names every path the
    build may write (a killed build's partial files must be its to remove), but a path it did not write (the test
    split of a recipe without one, ``fingerprints.npz`` of a build without dedup) is not its: a file a user puts
    there later was deleted by the next rebuild."""
    state = read_json(layout.state / "state.json")
    if not isinstance(state, dict) or not isinstance(state.get("owned"), list):
        return
    state["owned"] = [rel for rel in state["owned"]
                      if isinstance(rel, str) and os.path.lexists(layout.root / rel)]
    write_text_atomic(layout.state / "state.json", json.dumps(state))


# Names in an output folder that hold no user data of their own: a dataset_info.json to merge into, and its lock.
_SHARED_NAMES = {"dataset_info.json", ".dataset_info.json.lock"}


def _owned(layout: Layout, state: dict | None) -> list[Path]:
    """The paths an earlier build in this folder wrote, as its state recorded them (resolved inside the folder: a
    tampered state never names a file outside). States written before ownership was recorded name the files of
    their layout, as those builds did."""
    if not state:
        return []
    if "owned" in state:
        paths = [layout.root / rel for rel in state["owned"] if isinstance(rel, str)]
    else:
        old = Layout(layout.root, state.get("name", layout.name), state.get("file_format", layout.file_format),
                     state.get("split_enabled", layout.split_enabled), layout.dataset_info)
        paths = old.owned_paths()
    root = Path(os.path.realpath(layout.root))
    return [p for p in paths if Path(os.path.realpath(p.parent)).is_relative_to(root) and p.name not in ("", ".", "..")]


def registered(layout: Layout, manifest: dict, recipe: Recipe) -> bool:
    """The manifest's datasets are (still) in the dataset_info.json this recipe points at."""
    if manifest.get("shard") != [0, 1]:
        return True
    if os.path.relpath(layout.dataset_info, layout.root).replace(os.sep, "/") != manifest.get("dataset_info"):
        return False
    info = read_json(layout.dataset_info) or {}
    return all(name in info for name in manifest.get("datasets", {}))
