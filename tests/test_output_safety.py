"""A build never removes or changes a byte of a file it did not write.

Every case lays out a user's folder the way people do (sources inside or beside the output folder, a LLaMA-Factory
``data/`` folder, files that share a name with a build's outputs), hashes every file mmdata did not write, runs
builds, rebuilds after a recipe change, ``--overwrite``, kills and resumes, and hashes again. Overlaps between the
output folder and the source are refused before anything is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import jpeg_bytes, write_recipe

import mmdata
from mmdata.errors import BuildError


def hashes(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file (symlinks: their target text) below ``folder``, except below ``skip``."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_symlink():
            found[path.relative_to(folder).as_posix()] = "link:" + os.readlink(path)
        elif path.is_file():
            found[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def foreign(folder: Path, out: Path) -> dict[str, str]:
    """The user's files: everything in ``folder`` except what the build in ``out`` owns."""
    state = json.loads((out / ".mmdata" / "state.json").read_text()) if (out / ".mmdata" / "state.json").exists() else {}
    owned = {(out / rel).resolve() for rel in state.get("owned", [])}
    return {rel: h for rel, h in hashes(folder).items()
            if not any(p in owned for p in [(folder / rel).resolve(), *(folder / rel).resolve().parents])}


def turn(image: str, text: str = "q") -> dict:
    return {"images": [image], "messages": [{"role": "user", "content": f"<image>{text}"},
                                            {"role": "assistant", "content": "a"}]}


def jsonl_source(folder: Path, rows: int = 6, name: str = "data.jsonl") -> Path:
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        (folder / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(color=(i * 30 % 255, 5, 5)))
    (folder / name).write_text("\n".join(json.dumps(turn(f"imgs/{i}.jpg", f"q{i}")) for i in range(rows)) + "\n")
    return folder / name


def recipe(folder: Path, out: Path, source: dict, **extra) -> Path:
    spec = {"name": "t", "source": source, "output": {"dir": str(out)}, **extra}
    return write_recipe(folder / "r.yaml", spec)


def build(path: Path, **kw):
    return mmdata.build(str(path), num_proc=1, **kw)


# ----------------------------------------------------------------------------------------------- overlaps: refused


def test_imagefolder_source_inside_the_output_folder_is_refused_untouched(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(jpeg_bytes())
        (tmp_path / "images" / f"{i}.txt").write_text(f"caption {i}")
    before = hashes(tmp_path)
    r = recipe(tmp_path / "images", tmp_path, {"type": "imagefolder", "path": "."})
    before = hashes(tmp_path)
    with pytest.raises(BuildError, match="contains the source's input"):
        build(r)
    assert hashes(tmp_path) == before


def test_json_source_with_the_dataset_name_in_the_output_folder_is_refused(tmp_path):
    """The classic: ``t.json`` as source and ``output.dir`` its folder, file_format json (``t.json`` is the output)."""
    jsonl_source(tmp_path, name="t.json")
    r = recipe(tmp_path, tmp_path, {"type": "json", "path": "t.json"}, )
    spec = json.loads(json.dumps(__import__("yaml").safe_load(r.read_text())))
    spec["output"]["file_format"] = "json"
    write_recipe(r, spec)
    before = hashes(tmp_path)
    with pytest.raises(BuildError, match="is the source's input|contains the source's input"):
        build(r)
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("where", ["inside_scanned", "is_allowed_root", "contains_allowed_root", "is_image_root"])
def test_overlaps_with_read_folders_are_refused(tmp_path, where):
    src = tmp_path / "src"
    src.mkdir()
    jsonl_source(src)
    extra_root = tmp_path / "shared_images"
    extra_root.mkdir()
    (extra_root / "x.jpg").write_bytes(jpeg_bytes())
    source = {"type": "jsonl", "path": str(src), "allowed_roots": [str(extra_root)]}
    out = {"inside_scanned": src / "out", "is_allowed_root": extra_root, "contains_allowed_root": tmp_path,
           "is_image_root": src}[where]
    r = recipe(tmp_path, out, source)
    before = hashes(tmp_path)
    with pytest.raises(BuildError, match="output.dir"):
        build(r)
    assert hashes(tmp_path) == before
    assert out.exists() == (where != "inside_scanned")  # a refused build leaves no folder of its own behind


def test_output_beside_a_csv_in_its_folder_is_allowed(tmp_path):
    """The tutorial layout: the CSV and its images in the project folder, output in ``out/`` below it."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "train.csv").write_text("image_path,text\nimgs/a.jpg,x\n")
    r = recipe(tmp_path, tmp_path / "out", {"type": "csv", "path": "train.csv"},
               fields={"image": "image_path", "answer": "text"}, prompt="read it")
    before = hashes(tmp_path)
    assert build(r).written == 1
    assert {k: v for k, v in hashes(tmp_path).items() if not k.startswith("out/")} == before


# ----------------------------------------------------------------------------------------------- foreign folders


def test_a_non_empty_folder_that_is_no_build_is_refused_unless_allowed(tmp_path):
    jsonl_source(tmp_path / "src")
    out = tmp_path / "LLaMA-Factory" / "data"
    out.mkdir(parents=True)
    (out / "mllm_demo.json").write_text("[]")
    (out / "notes.tmp").write_text("mine")  # a user's *.tmp at the top: builds used to delete these
    (out / "stuff.tmp").mkdir()
    (out / "stuff.tmp" / "keep").write_text("mine too")
    (out / "dataset_info.json").write_text(json.dumps({"mllm_demo": {"file_name": "mllm_demo.json"}}))
    r = recipe(tmp_path / "src", out, {"type": "jsonl", "path": "data.jsonl"})
    before = hashes(out)
    with pytest.raises(BuildError, match="is not empty .*allow_existing"):
        build(r)
    assert hashes(out) == before
    result = build(r, output__allow_existing=True)
    assert result.written == 6
    user = {k: v for k, v in before.items() if k != "dataset_info.json"}
    assert {k: v for k, v in foreign(out, out).items() if k in user} == user
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["mllm_demo"] == {"file_name": "mllm_demo.json"} and "t" in info
    # a rebuild after a recipe change, then --overwrite with a split: still nothing of the user's changes
    build(r, output__allow_existing=True, prompt="changed")
    build(r, output__allow_existing=True, output__overwrite=True, split__val=2)
    assert {k: v for k, v in hashes(out).items() if k in user} == user


@pytest.mark.parametrize("planted", ["t", "images", "rejects.jsonl", "mmdata_build.json", "t_val"])
def test_a_foreign_file_at_a_path_the_build_would_write_is_never_replaced(tmp_path, planted):
    jsonl_source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    target = out / planted
    if planted in ("images", "t", "t_val"):
        target.mkdir()
        (target / "precious.jpg").write_bytes(b"user data")
    else:
        target.write_text("user data")
    r = recipe(tmp_path / "src", out, {"type": "jsonl", "path": "data.jsonl"},
               **({"split": {"val": 2}} if planted == "t_val" else {}))
    before = hashes(out)
    with pytest.raises(BuildError, match="was not written by mmdata"):
        build(r, output__allow_existing=True)
    assert hashes(out) == before


def test_files_a_user_adds_to_a_build_folder_survive_rebuilds(tmp_path):
    jsonl_source(tmp_path / "src")
    out = tmp_path / "out"
    r = recipe(tmp_path / "src", out, {"type": "jsonl", "path": "data.jsonl"})
    build(r)
    (out / "README.txt").write_text("my notes")
    (out / "t_val").mkdir()  # the user's folder, named like the val split a later recipe writes
    (out / "t_val" / "x.json").write_text("{}")
    (out / "images" / "mine.jpg").write_bytes(b"inside an owned folder: a rebuild may clear it")
    keep = {k: v for k, v in hashes(out).items() if k.startswith(("README", "t_val"))}
    build(r, prompt="again")  # recipe change: the old build's own files go, the user's stay
    assert {k: v for k, v in hashes(out).items() if k in keep} == keep
    with pytest.raises(BuildError, match="t_val already exists and was not written by mmdata"):
        build(r, split__val=2, output__overwrite=True)
    assert {k: v for k, v in hashes(out).items() if k in keep} == keep


def test_a_tampered_state_never_names_a_file_outside_the_folder(tmp_path):
    jsonl_source(tmp_path / "src")
    out = tmp_path / "out"
    r = recipe(tmp_path / "src", out, {"type": "jsonl", "path": "data.jsonl"})
    build(r)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    sibling = tmp_path / "out2" / "precious"  # its folder's path starts with the output folder's
    sibling.parent.mkdir()
    sibling.write_text("keep me too")
    state_file = out / ".mmdata" / "state.json"
    state = json.loads(state_file.read_text())
    state["owned"] += ["../victim.txt", "/etc/hostname", "../src", "../out2/precious", "../out2"]
    state_file.write_text(json.dumps(state))
    before = hashes(tmp_path, skip=out)
    build(r, prompt="changed")
    assert hashes(tmp_path, skip=out) == before and sibling.read_text() == "keep me too"


@pytest.mark.parametrize("under", ["", "sub"])
def test_an_output_dir_that_is_a_file_or_lies_under_one_is_refused_naming_it(tmp_path, under):
    """It used to fail with the OS error and "rerun the same command: the build resumes", which cannot help."""
    jsonl_source(tmp_path / "src")
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    r = recipe(tmp_path / "src", afile / under if under else afile, {"type": "jsonl", "path": "data.jsonl"})
    with pytest.raises(BuildError, match=r"afile\.txt is a file, not a folder"):
        build(r)
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("planted", ["link", "file", "folder of the user's", "fifo"])
def test_a_state_folder_that_is_not_mmdatas_is_never_cleared(tmp_path, planted):
    """``.mmdata`` is the one name a build clears wholesale: a link there, a file, or a folder holding other files
    is the user's, even with --allow-existing (a link was followed out of the folder and emptied its target)."""
    jsonl_source(tmp_path / "src")
    out, victim = tmp_path / "out", tmp_path / "victim"
    (victim / "parts").mkdir(parents=True)
    (victim / "important").write_text("keep me")
    (victim / "parts" / "p").write_text("me too")
    out.mkdir()
    if planted == "link":
        (out / ".mmdata").symlink_to(victim)
    elif planted == "file":
        (out / ".mmdata").write_text("my notes")
    elif planted == "fifo":  # opening it to lock it blocked the build forever, holding the folder's claim
        os.mkfifo(out / ".mmdata")
    else:
        (out / ".mmdata" / "done").mkdir(parents=True)
        (out / ".mmdata" / "notes").write_text("mine")
    r = recipe(tmp_path / "src", out, {"type": "jsonl", "path": "data.jsonl"})
    before = hashes(tmp_path)
    with pytest.raises(BuildError, match=r"\.mmdata (is a (link|file), not mmdata's state folder|holds notes)"):
        build(r, output__allow_existing=True)
    assert hashes(tmp_path) == before


# ----------------------------------------------------------------------------------------------- crashes and races


def _cli(recipe_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mmdata.cli", "build", str(recipe_path), "--quiet", "--num-proc", "1", *args]


def test_kill_and_resume_in_a_shared_folder_keep_the_users_files(tmp_path):
    src = tmp_path / "src"
    jsonl_source(src, rows=120)
    out = tmp_path / "data"
    out.mkdir()
    (out / "mllm_demo.json").write_text("[1, 2, 3]")
    (out / "x.tmp").write_text("user tmp")
    spec = {"name": "t", "source": {"type": "jsonl", "path": "data.jsonl"}, "split": {"val": 5},
            "output": {"dir": str(out), "shard_size": 4, "allow_existing": True}}
    r = write_recipe(src / "r.yaml", spec)
    before = hashes(out)
    for delay in (0.9, 1.2, 1.6):
        proc = subprocess.Popen(_cli(r), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert {k: v for k, v in hashes(out).items() if k in before} == before
    done = subprocess.run(_cli(r), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {k: v for k, v in hashes(out).items() if k in before} == before


def _slow_source(src: Path, rows: int = 48) -> dict:
    """A build that takes seconds: every row re-encodes one large image (stored once)."""
    import io

    from PIL import Image

    src.mkdir()
    buf = io.BytesIO()
    Image.effect_noise((1000, 1000), 60).convert("RGB").save(buf, format="JPEG")
    (src / "big.jpg").write_bytes(buf.getvalue())
    (src / "data.jsonl").write_text("\n".join(json.dumps(turn("big.jpg", f"q{i}")) for i in range(rows)) + "\n")
    return {"images": {"mode": "convert", "format": "png"}, "source": {"type": "jsonl", "path": "data.jsonl"},
            "output": {"dir": str(src.parent / "out"), "shard_size": 1}}


def _start(recipe_path: Path, *args: str) -> subprocess.Popen:
    """Start a build; return once it runs its tasks (it holds the folder as a running build)."""
    proc = subprocess.Popen(_cli(recipe_path, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done, deadline = recipe_path.parent.parent / "out" / ".mmdata" / "done", time.monotonic() + 60
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


def _refused_while_running(late: subprocess.CompletedProcess, proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the first build ended before the second started: make it slower"
    assert late.returncode == BuildError.exit_code and "another build is writing into" in late.stderr
    assert "Traceback" not in late.stderr


def _records(folder: Path) -> int:
    return sum(len(part.read_text().splitlines()) for part in folder.glob("*.jsonl"))


@pytest.mark.parametrize("second_prompt", ["other", None], ids=["another recipe", "the same recipe"])
def test_a_second_build_into_a_folder_while_one_runs_is_refused_cleanly(tmp_path, second_prompt):
    """The same recipe twice at once was not refused: both built and finalised, and a build that reported success
    could leave fewer records than its manifest counts."""
    slow = _slow_source(tmp_path / "src")
    out = tmp_path / "out"
    first = write_recipe(tmp_path / "src" / "a.yaml", {"name": "a", **slow})
    second = write_recipe(tmp_path / "src" / "b.yaml",
                          {"name": "a", **slow, **({"prompt": second_prompt} if second_prompt else {})})
    proc = _start(first)
    _refused_while_running(subprocess.run(_cli(second), capture_output=True, text=True), proc)
    assert proc.wait() == 0, proc.stderr.read()
    info = json.loads((out / "dataset_info.json").read_text())
    assert json.loads((out / "mmdata_build.json").read_text())["counts"]["written"] == 48 and "a" in info
    assert _records(out / "a") == 48
    assert len(list((out / "images").rglob("*.png"))) == 1  # one image under 48 records: stored once


def test_shard_parts_build_side_by_side_in_one_folder_but_one_part_never_twice_at_once(tmp_path):
    slow = _slow_source(tmp_path / "src")
    out = tmp_path / "out"
    r = write_recipe(tmp_path / "src" / "a.yaml", {"name": "a", **slow})
    proc = _start(r, "--shard", "0/2")
    _refused_while_running(subprocess.run(_cli(r, "--shard", "0/2"), capture_output=True, text=True), proc)
    beside = subprocess.run(_cli(r, "--shard", "1/2"), capture_output=True, text=True)
    assert beside.returncode == 0, beside.stderr
    assert proc.wait() == 0, proc.stderr.read()
    merged = subprocess.run([sys.executable, "-m", "mmdata.cli", "merge", str(out)], capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    assert _records(out / "a") == 48


def test_a_rebuild_never_removes_a_file_at_a_path_the_build_did_not_write(tmp_path):
    """A finished build owns what it wrote, not every path it might have: the user's t_test.json beside a build
    without a test split, and fingerprints.npz beside one without dedup, were deleted by the next rebuild. Now they
    are the user's: a rebuild that might write there is refused, naming the file, and leaves it as it is."""
    jsonl_source(tmp_path / "src")
    out = tmp_path / "out"
    r = recipe(tmp_path / "src", out, {"type": "jsonl", "path": "data.jsonl"}, split={"val": 2},
               output={"dir": str(out), "format": "sharegpt", "file_format": "json"})
    build(r)
    assert (out / "t_train.json").is_file() and not (out / "t_test.json").exists()
    (out / "t_test.json").write_text('["mine"]')
    with pytest.raises(BuildError, match="t_test.json already exists and was not written by mmdata"):
        build(r, prompt="again", rebuild=True)
    assert (out / "t_test.json").read_text() == '["mine"]'
    (out / "t_test.json").unlink()
    (out / "fingerprints.npz").write_bytes(b"mine too")
    with pytest.raises(BuildError, match="fingerprints.npz already exists and was not written by mmdata"):
        build(r, prompt="again", rebuild=True)
    assert (out / "fingerprints.npz").read_bytes() == b"mine too"


def test_merge_links_only_what_the_shards_staged_and_keeps_the_targets_registry_and_files(tmp_path):
    """A shard folder that also held a dataset_info.json (a trial build's) and a user's notes: merge linked every
    file of it into the target, replacing the user's 104-entry registry with the part's and the target's notes."""
    from mmdata.finalize import merge_shards

    jsonl_source(tmp_path / "src", rows=8)
    r = recipe(tmp_path / "src", tmp_path / "p0", {"type": "jsonl", "path": "data.jsonl"},
               output={"dir": str(tmp_path / "p0"), "shard_size": 2, "allow_existing": True})
    build(r, max_samples=2)  # a trial build leaves p0/dataset_info.json
    (tmp_path / "p0" / "notes.txt").write_text("part 0 log")
    parts = [tmp_path / "p0", tmp_path / "p1"]
    for i, part in enumerate(parts):
        mmdata.build(str(r), num_proc=1, shard=(i, 2), output__dir=str(part))
    root = tmp_path / "root"
    root.mkdir()
    registry = {f"user_{i}": {"file_name": f"u{i}.json"} for i in range(104)}
    (root / "dataset_info.json").write_text(json.dumps(registry, indent=2))
    (root / "notes.txt").write_text("the user's only copy")
    result = merge_shards(root, parts)
    info = json.loads((root / "dataset_info.json").read_text())
    assert set(registry) <= set(info) and "t" in info and result.written == 8
    assert (root / "notes.txt").read_text() == "the user's only copy"
