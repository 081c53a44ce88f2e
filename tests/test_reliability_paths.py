"""No path escapes: property tests over generated ids, image paths and dataset names.

Policy (docs/reliability.md): a record's image path resolves against the source's ``image_root`` and, after ``..``
and symlinks are resolved, must lie inside the allowed roots (``image_root`` plus ``source.allowed_roots``); anything
else is a reject. Output file names come from record positions only. The one declared write outside the output
folder is ``output.dataset_info``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import jpeg_bytes, write_recipe

import mmdata
from mmdata.errors import RecipeError, SampleError
from mmdata.normalize import image_refs
from mmdata.pipeline import SPLITS, Layout
from mmdata.recipes import validate_recipe

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
BUILDS = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def tree():
    """base/root (the image_root) holds images and symlinks pointing out; base/outside holds a 'secret' image."""
    base = Path(tempfile.mkdtemp(prefix="mmdata-paths-"))
    root, outside, extra = base / "root", base / "outside", base / "extra"
    for folder in (root / "sub", outside, extra):
        folder.mkdir(parents=True)
    for name in ("a.jpg", "sub/b.jpg", "spaced name.jpg", "ünï.jpg", "..dots.jpg"):
        (root / name).write_bytes(jpeg_bytes())
    (outside / "secret.jpg").write_bytes(jpeg_bytes(color=(1, 2, 3)))
    (extra / "c.jpg").write_bytes(jpeg_bytes())
    (root / "link_out.jpg").symlink_to(outside / "secret.jpg")
    (root / "dir_out").symlink_to(outside)
    (root / "link_in.jpg").symlink_to(root / "a.jpg")
    (root / "loop").symlink_to(root / "loop")
    yield base
    shutil.rmtree(base)


SEGMENTS = st.sampled_from(["..", ".", "a.jpg", "sub", "b.jpg", "link_out.jpg", "dir_out", "secret.jpg",
                            "link_in.jpg", "loop", "outside", "root", "extra", "c.jpg", "", "~", "..dots.jpg"])
PATHS = st.one_of(
    st.lists(SEGMENTS, min_size=1, max_size=8).map("/".join),
    st.lists(SEGMENTS, min_size=1, max_size=8).map(lambda parts: "/" + "/".join(parts)),
    st.text(max_size=300),
)


def _inside(path: Path, roots: list[Path]) -> bool:
    real = os.path.realpath(path)
    return any(real == os.path.realpath(r) or real.startswith(os.path.realpath(r) + os.sep) for r in roots)


@FAST
@given(path=PATHS, with_extra=st.booleans(), as_dict=st.booleans())
def test_a_record_image_path_never_resolves_outside_the_allowed_roots(tree, path, with_extra, as_dict):
    root = tree / "root"
    roots = [root, tree / "extra"] if with_extra else [root]
    value = {"bytes": None, "path": path} if as_dict else path
    try:
        refs = image_refs(value, root, roots)
    except SampleError:
        return  # rejected with a reason: fine
    for ref in refs:
        assert _inside(ref.path, roots), (path, ref.path)
        assert ref.path == Path(os.path.realpath(ref.path))  # what is read is what was checked (no later symlink)


def test_escapes_by_dotdot_absolute_and_symlink_are_rejected_unless_declared(tree):
    root = tree / "root"
    for path in ["../outside/secret.jpg", str(tree / "outside/secret.jpg"), "link_out.jpg", "dir_out/secret.jpg",
                 "sub/../../outside/secret.jpg"]:
        with pytest.raises(SampleError, match="resolves outside the allowed folders"):
            image_refs(path, root)
        (ref,) = image_refs(path, root, [root, tree / "outside"])  # declared: allowed
        assert ref.path == (tree / "outside/secret.jpg").resolve()
    assert image_refs("link_in.jpg", root)[0].path == (root / "a.jpg").resolve()  # symlinks inside are fine


def test_allowed_roots_is_a_source_option_that_lets_a_build_read_a_declared_folder(tree, tmp_path):
    records = [{"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
                "images": [str(tree / "extra/c.jpg")]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    spec = {"name": "t", "source": {"type": "jsonl", "path": "d.jsonl"}, "output": {"dir": str(tmp_path / "o")}}
    closed = mmdata.build(str(write_recipe(tmp_path / "r.yaml", spec)), num_proc=1)
    assert closed.counts["rejected_by_reason"] == {"image path outside allowed roots": 1}
    spec["source"]["allowed_roots"] = [str(tree / "extra")]
    opened = mmdata.build(str(write_recipe(tmp_path / "r.yaml", spec)), num_proc=1)
    assert opened.written == 1


def _snapshot(folder: Path, skip: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if skip in p.parents or p == skip or p.is_symlink() or not p.is_file():
            continue
        out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


IDS = st.one_of(st.text(max_size=40), st.sampled_from(["../../x", "/etc/passwd", "a\x00b", "x" * 300, "..", "~root",
                                                         "C:\\win", "a/b", "a_b", "dup"]), st.integers())
INFO_FILES = {"dataset_info.json", "dataset_info.json.lock", ".dataset_info.json.lock"}  # the file and its lock
NAME = re.compile(r"^images/([0-9a-f]{2})/(\1[0-9a-f]{30})\.(jpg|png)$")


@BUILDS
@given(records=st.lists(st.tuples(IDS, PATHS | st.sampled_from(["a.jpg", "sub/b.jpg", "ünï.jpg", "link_in.jpg"])),
                        min_size=1, max_size=12))
def test_a_build_writes_only_content_named_files_inside_its_output(tree, records):
    work = Path(tempfile.mkdtemp(dir=tree))
    try:
        lines = [json.dumps({"id": rid, "images": [path], "messages": [
            {"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]}) for rid, path in records]
        (tree / "root" / "data.jsonl").write_text("\n".join(lines) + "\n")
        out = work / "out"
        spec = {"name": "t", "source": {"type": "jsonl", "path": str(tree / "root" / "data.jsonl")},
                "output": {"dir": str(out), "shard_size": 5}}
        before = _snapshot(tree, skip=work)
        result = mmdata.build(str(write_recipe(work / "r.yaml", spec)), num_proc=1)
        after = _snapshot(tree, skip=work)
        assert before == after  # nothing outside the output folder was written (or modified)
        assert result.read == len(records) == result.written + result.rejected
        allowed_top = {"images", "t", "rejects.jsonl", "mmdata_build.json", ".mmdata", *INFO_FILES}
        assert {p.name for p in out.iterdir()} <= allowed_top
        stored = set()
        for image in (out / "images").rglob("*.*") if (out / "images").exists() else []:
            match = NAME.match(image.relative_to(out).as_posix())
            assert match, image  # named by its content only, never by id or source name
            assert match.group(2) == hashlib.sha256(image.read_bytes()).hexdigest()[:32]
            stored.add(image.relative_to(out).as_posix())
            assert image.read_bytes() == jpeg_bytes()  # only in-root images were read (the secret differs)
        for part in (out / "t").glob("*") if (out / "t").exists() else []:
            assert re.fullmatch(r"part-\d{5}\.jsonl", part.name)
        # split on "\n" only: ids may hold U+0085 / U+2028, which str.splitlines() would also split on
        rejected = {json.loads(x)["position"] for x in (out / "rejects.jsonl").read_text().split("\n") if x} \
            if (out / "rejects.jsonl").exists() else set()
        written = [json.loads(x) for part in sorted((out / "t").glob("*")) for x in part.read_text().split("\n") if x] \
            if (out / "t").exists() else []
        assert len(written) == len(records) - len(rejected)
        assert {path for record in written for path in record["images"]} == stored  # every stored image is used
    finally:
        shutil.rmtree(work)


@FAST
@given(name=st.text(max_size=60))
def test_every_accepted_dataset_name_keeps_output_paths_inside_the_output_folder(tmp_path_factory, name):
    root = Path("/srv/out")
    try:
        recipe = validate_recipe({"name": "r", "source": {"type": "jsonl", "path": "d.jsonl"},
                                  "output": {"dir": str(root), "name": name}})
    except RecipeError:
        return
    for fmt in ("jsonl", "json"):
        for split_enabled in (False, True):
            layout = Layout(root, recipe.dataset_name, fmt, split_enabled, root / "dataset_info.json")
            paths = [*layout.owned_paths(), *(layout.data_path(s) for s in SPLITS), layout.image("0" * 32, "jpg"),
                     layout.rejects_part(7), layout.marker(7)]
            for path in paths:
                assert os.path.normpath(path).startswith(str(root) + os.sep), (name, path)


def test_dataset_info_outside_the_output_folder_is_the_one_declared_exception(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "src" / "d.jsonl").write_text(json.dumps({"images": ["a.jpg"], "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    lf = tmp_path / "LLaMA-Factory" / "data"
    lf.mkdir(parents=True)
    (lf / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    spec = {"name": "t", "source": {"type": "jsonl", "path": "d.jsonl"},
            "output": {"dir": str(tmp_path / "out"), "dataset_info": str(lf / "dataset_info.json")}}
    mmdata.build(str(write_recipe(tmp_path / "src" / "r.yaml", spec)), num_proc=1)
    assert {p.name for p in lf.iterdir()} - INFO_FILES == set() and (lf / "dataset_info.json").is_file()
    info = json.loads((lf / "dataset_info.json").read_text())
    assert info["mine"] == {"file_name": "mine.json"}
    assert info["t"]["file_name"] == "../../out/t"
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["a.jpg", "d.jsonl", "r.yaml"]
