"""The output folder of a build: where every file goes, what the build owns there, and how it is claimed.

Records spell image paths relative to the folder of ``dataset_info.json``. Only what a build writes is its own: the
split files, ``images/``, ``rejects.jsonl``, the manifest ``mmdata_build.json`` and the state folder ``.mmdata/``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import BuildError
from .recipes import Recipe
from .writers.llamafactory import unregister_datasets, write_text_atomic

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

    def marker(self, task: int) -> Path:
        return self.state / "done" / f"task-{task:05d}.json"

    def image(self, task: int, position: int, k: int, extension: str) -> Path:
        return self.root / self.image_rel(task, position, k, extension)

    @staticmethod
    def image_rel(task: int, position: int, k: int, extension: str) -> str:
        """An image's path relative to the output folder, as records spell it (after ``media_prefix``)."""
        return f"images/{task:05d}/{position:09d}_{k}.{extension}"

    def owned_paths(self) -> list[Path]:
        """Everything a build of this layout may create (what a rebuild removes; nothing else is touched)."""
        return [*(self.data_path(s) for s in SPLITS), self.root / "images", self.root / "rejects.jsonl",
                self.root / MANIFEST, self.state]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def claim_output(layout: Layout, recipe: Recipe, fingerprint: str) -> None:
    """Make ``layout.root`` this build's: keep finished tasks of the same fingerprint, clear a stale build's files."""
    state_file = layout.state / "state.json"
    state = read_json(state_file)
    if state and state.get("name") != recipe.dataset_name and not recipe.output.overwrite:
        raise BuildError(
            f"{layout.root} holds the build {state.get('name')!r}; choose another output.dir, or pass --overwrite "
            "to replace it"
        )
    if state and state.get("fingerprint") != fingerprint:
        # Unregister the stale build first: its dataset_info entries must never point at files being rebuilt.
        old_manifest = read_json(layout.root / MANIFEST) or {}
        if old_manifest.get("datasets") and old_manifest.get("dataset_info"):
            unregister_datasets((layout.root / old_manifest["dataset_info"]).resolve(),
                                {name: d.get("file_name") for name, d in old_manifest["datasets"].items()})
        old = Layout(layout.root, state["name"], state.get("file_format", layout.file_format),
                     state.get("split_enabled", layout.split_enabled), layout.dataset_info)
        for path in old.owned_paths():
            if not path.resolve().is_relative_to(layout.root):  # a tampered state.json never deletes outside
                continue
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif not state:
        (layout.root / MANIFEST).unlink(missing_ok=True)
        # Task markers without a state.json are a stale build's, caught mid-deletion by a kill (rmtree removes
        # files in directory order, state.json possibly first): resuming from them would mix two recipes' output.
        if layout.state.exists():
            shutil.rmtree(layout.state)
    layout.state.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed run: staged splits/manifest at the top, staged parts in the state folder. Image ``.tmp``
    # files are not searched for (that would walk millions of images): the unfinished task rewrites the same names.
    # A dataset_info.json's temporary file may belong to another build merging right now: those are removed under
    # that file's lock (``merge_dataset_info``), never here.
    for tmp in itertools.chain(layout.root.glob("*.tmp"), layout.state.rglob("*.tmp")):
        if not tmp.name.startswith(".dataset_info"):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    write_text_atomic(state_file, json.dumps({
        "name": recipe.dataset_name, "fingerprint": fingerprint, "file_format": layout.file_format,
        "split_enabled": layout.split_enabled}))


def registered(layout: Layout, manifest: dict, recipe: Recipe) -> bool:
    """The manifest's datasets are (still) in the dataset_info.json this recipe points at."""
    if manifest.get("shard") != [0, 1]:
        return True
    if os.path.relpath(layout.dataset_info, layout.root).replace(os.sep, "/") != manifest.get("dataset_info"):
        return False
    info = read_json(layout.dataset_info) or {}
    return all(name in info for name in manifest.get("datasets", {}))
