"""Crash safety, concurrent writers, disk full and read-only output.

- kill -9 at random points of a build, repeatedly: what is visible is always either absent or complete (and equal to
  what an uninterrupted build writes), the user's dataset_info.json is never corrupt, and a rerun completes
  byte-identically;
- several processes registering into one dataset_info.json lose no entry;
- ENOSPC (a real size-limited tmpfs when this runs as root, an injected error otherwise) and a read-only output give
  one BuildError naming the file, and the rerun after freeing space completes byte-identically.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import write_recipe

import mmdata
from mmdata.errors import BuildError
from mmdata.writers.llamafactory import merge_dataset_info

USER_INFO = {"user_dataset": {"file_name": "mine.json", "formatting": "sharegpt"}, "other": {"file_name": "o.json"}}


def make_source(folder: Path, rows: int = 48) -> None:
    import io

    from PIL import Image

    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(rows):
        buf = io.BytesIO()
        Image.effect_noise((48, 32), 40 + i % 50).convert("RGB").save(buf, format="JPEG", quality=90)
        (folder / "imgs" / f"{i}.jpg").write_bytes(buf.getvalue())
        image = f"imgs/{i}.jpg" if i % 11 else "imgs/missing.jpg"  # a few rejects too
        records.append({"id": i, "images": [image], "messages": [
            {"role": "user", "content": f"<image>question {i}"}, {"role": "assistant", "content": f"answer {i}"}]})
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def recipe_for(folder: Path, out: Path, info: Path, **extra) -> Path:
    spec = {"name": "k", "source": {"type": "jsonl", "path": "data.jsonl"}, "split": {"val": 6},
            "output": {"dir": str(out), "shard_size": 4, "dataset_info": str(info)}, **extra}
    return write_recipe(folder / f"recipe-{extra.get('prompt', 'base')[:4]}.yaml", spec)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file a reader could see (resume state and temporary files excluded), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".mmdata" not in p.parts and not any(part.endswith(".tmp") for part in p.parts)}


def cli(recipe: Path, num_proc: int = 2) -> list[str]:
    return [sys.executable, "-m", "mmdata.cli", "build", str(recipe), "--quiet", "--num-proc", str(num_proc)]


def check_visible_state(out: Path, info_path: Path, reference: dict[str, bytes], ref_info: dict) -> None:
    """What LLaMA-Factory or a later run could read right after a kill: absent or complete, never half-written."""
    info = json.loads(info_path.read_text())  # always valid JSON
    for name, entry in USER_INFO.items():
        assert info[name] == entry  # the user's entries are never lost
    for name, entry in info.items():
        if name in ref_info:  # registered => the whole dataset is there, exactly as an uninterrupted build wrote it
            assert entry == ref_info[name]
            dataset = (info_path.parent / entry["file_name"]).resolve()
            for rel, data in reference.items():
                if (out / rel).resolve().is_relative_to(dataset):
                    assert (out / rel).read_bytes() == data, rel
    for rel, data in snapshot(out).items():
        # every visible file is complete: parts, images, rejects and the manifest equal the reference bytes
        assert rel in reference and data == reference[rel], rel


@pytest.fixture
def crash_setup(tmp_path):
    make_source(tmp_path, rows=96)  # 24 tasks: about half a second of work after a ~0.7 s start-up
    lf = tmp_path / "lf"
    lf.mkdir()
    info = lf / "dataset_info.json"
    out = tmp_path / "out"
    recipe = recipe_for(tmp_path, out, info)
    info.write_text(json.dumps(USER_INFO))
    started = time.monotonic()
    subprocess.run(cli(recipe), check=True, capture_output=True)
    duration = time.monotonic() - started  # kill delays are fractions of it, whatever the machine's speed
    reference, ref_info = snapshot(out), json.loads(info.read_text())
    assert "k_train" in ref_info and "k_val" in ref_info
    shutil.rmtree(out)
    info.write_text(json.dumps(USER_INFO))
    return tmp_path, recipe, out, info, reference, ref_info, duration


def kill_at(command: list[str], delay: float) -> bool:
    """Start ``command``, SIGKILL it after ``delay`` seconds; True if it was killed (False: it finished first)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    assert proc.returncode == 0, proc.stderr.read().decode()
    return False


def test_kill_9_twenty_times_never_leaves_a_corrupt_or_partial_visible_state_and_resume_completes(crash_setup):
    tmp_path, recipe, out, info, reference, ref_info, duration = crash_setup
    rng = random.Random(7)
    killed = completed = 0
    for _ in range(20):
        if kill_at(cli(recipe), rng.uniform(0.15, 0.75) * duration):
            killed += 1
        else:
            completed += 1
        check_visible_state(out, info, reference, ref_info)
        if not (out / "mmdata_build.json").exists() and rng.random() < 0.25:
            continue  # keep killing the same half-built folder
        if (out / "mmdata_build.json").exists():
            assert snapshot(out) == reference
            shutil.rmtree(out)  # start the next trials from scratch
            info.write_text(json.dumps(USER_INFO))
    subprocess.run(cli(recipe), check=True, capture_output=True)  # resume whatever the last kill left
    assert snapshot(out) == reference
    assert json.loads(info.read_text()) == ref_info
    print(f"kill -9 trials: {killed} killed mid-build, {completed} finished before the signal")
    assert killed >= 10, (killed, completed)  # most trials really were killed mid-build


def test_kill_9_during_a_rebuild_never_leaves_the_old_entry_pointing_at_files_being_rewritten(crash_setup):
    tmp_path, recipe, out, info, reference, ref_info, duration = crash_setup
    changed = recipe_for(tmp_path, out, info, prompt="Describe the image.")
    subprocess.run(cli(changed), check=True, capture_output=True)
    new_reference, new_info = snapshot(out), json.loads(info.read_text())
    rng = random.Random(3)
    for _ in range(5):
        shutil.rmtree(out)
        info.write_text(json.dumps(USER_INFO))
        subprocess.run(cli(recipe), check=True, capture_output=True)  # a finished build of the old recipe
        kill_at(cli(changed), rng.uniform(0.3, 0.9) * duration)
        current = json.loads(info.read_text())
        if (out / "mmdata_build.json").exists() and json.loads((out / "mmdata_build.json").read_text()) \
                ["fingerprint"] == json.loads(new_reference["mmdata_build.json"])["fingerprint"]:
            check_visible_state(out, info, new_reference, new_info)
        elif "k_train" in current:
            # mid-rebuild, yet registered: either the old entry before the claim unregistered it, or the new one in
            # the instant between its registration and its manifest. Either way the data it points at is complete.
            def data(snap: dict[str, bytes]) -> dict[str, bytes]:
                return {rel: b for rel, b in snap.items() if rel.startswith(("k_train/", "k_val/"))}

            assert data(snapshot(out)) in (data(reference), data(new_reference))
        subprocess.run(cli(changed), check=True, capture_output=True)
        assert snapshot(out) == new_reference and json.loads(info.read_text()) == new_info


# ----------------------------------------------------------------------------------------------- concurrency


def _merge_many(args: tuple[str, int]) -> None:
    path, worker = args
    for i in range(25):
        merge_dataset_info(Path(path), {f"w{worker}_{i}": {"file_name": f"w{worker}_{i}.jsonl"}})


def test_concurrent_merges_into_one_dataset_info_lose_no_entry(tmp_path):
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(USER_INFO))
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pool.map(_merge_many, [(str(path), w) for w in range(8)])
    info = json.loads(path.read_text())
    assert len(info) == 8 * 25 + len(USER_INFO)
    assert all(info[n] == e for n, e in USER_INFO.items())
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_concurrent_builds_into_one_dataset_info_lose_no_entry(tmp_path):
    make_source(tmp_path, rows=12)
    lf = tmp_path / "lf"
    lf.mkdir()
    info = lf / "dataset_info.json"
    info.write_text(json.dumps(USER_INFO))
    recipes = []
    for i in range(6):
        spec = {"name": f"b{i}", "source": {"type": "jsonl", "path": "data.jsonl"},
                # build 0 writes into the dataset_info folder itself: its start-up cleanup must spare the others' files
                # (a folder holding other files: it says so with allow_existing)
                "output": {"dir": str(lf if i == 0 else lf / f"b{i}"), "dataset_info": str(info), "shard_size": 3,
                           "allow_existing": i == 0}}
        recipes.append(write_recipe(tmp_path / f"b{i}.yaml", spec))
    procs = [subprocess.Popen(cli(r, num_proc=1), stderr=subprocess.PIPE) for r in recipes]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    registered = json.loads(info.read_text())
    assert {f"b{i}" for i in range(6)} <= set(registered)
    assert all(registered[n] == e for n, e in USER_INFO.items())


def test_a_build_start_leaves_another_builds_in_flight_dataset_info_temp_file_alone(tmp_path):
    make_source(tmp_path, rows=3)
    in_flight = tmp_path / "out" / ".dataset_info.json.x1y2.tmp"  # another process, mid merge, holding the lock
    in_flight.parent.mkdir()
    in_flight.write_text("{}")
    spec = {"name": "t", "source": {"type": "jsonl", "path": "data.jsonl"},
            "output": {"dir": str(tmp_path / "out"), "dataset_info": str(tmp_path / "elsewhere.json")}}
    mmdata.build(str(write_recipe(tmp_path / "r.yaml", spec)), num_proc=1)
    assert in_flight.exists()


# ----------------------------------------------------------------------------------------------- disk full / read-only


class Tmpfs:
    def __init__(self, path: Path):
        self.path = path

    def mount(self, options: str) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)], check=True,
                       capture_output=True)

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    fs = Tmpfs(mount_point)
    try:
        fs.mount("size=4m")
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC test covers the same path")
    yield fs
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _reference_then_clear(recipe: Path, out: Path, info: Path) -> tuple[dict, dict]:
    mmdata.build(str(recipe), num_proc=1)
    reference, ref_info = snapshot(out), json.loads(info.read_text())
    shutil.rmtree(out)
    info.write_text(json.dumps(USER_INFO))
    return reference, ref_info


def test_disk_full_on_a_real_tmpfs_is_one_error_then_the_rerun_completes_byte_identically(tmp_path, tmpfs):
    make_source(tmp_path, rows=60)
    out, info = tmpfs.path / "out", tmp_path / "dataset_info.json"
    info.write_text(json.dumps(USER_INFO))
    recipe = recipe_for(tmp_path, out, info)
    reference, ref_info = _reference_then_clear(recipe, out, info)
    tmpfs.remount("size=96k")  # room for a part of the images only
    with pytest.raises(BuildError, match="No space left on device; nothing half-written.*Free some space") as error:
        mmdata.build(str(recipe), num_proc=1)
    assert str(tmpfs.path) in str(error.value)  # names the file it could not write
    assert json.loads(info.read_text()) == USER_INFO  # nothing registered, nothing corrupt
    check_visible_state(out, info, reference, ref_info)
    tmpfs.remount("size=4m")  # space freed
    mmdata.build(str(recipe), num_proc=1)
    assert snapshot(out) == reference and json.loads(info.read_text()) == ref_info


def test_read_only_output_is_one_error_then_resumable(tmp_path, tmpfs):
    make_source(tmp_path, rows=12)
    out, info = tmpfs.path / "out", tmpfs.path / "dataset_info.json"
    recipe = recipe_for(tmp_path, out, info)
    info.write_text(json.dumps(USER_INFO))
    reference, ref_info = _reference_then_clear(recipe, out, info)
    tmpfs.remount("ro")
    with pytest.raises(BuildError, match="mnt/out: Read-only file system.*Make the output folder writable"):
        mmdata.build(str(recipe), num_proc=1)
    tmpfs.remount("rw")
    assert json.loads(info.read_text()) == USER_INFO
    mmdata.build(str(recipe), num_proc=1)
    assert snapshot(out) == reference and json.loads(info.read_text()) == ref_info


def test_read_only_dataset_info_keeps_the_data_and_registers_on_rerun(tmp_path, tmpfs):
    make_source(tmp_path, rows=12)
    out, info = tmp_path / "out", tmpfs.path / "dataset_info.json"
    info.write_text(json.dumps(USER_INFO))
    recipe = recipe_for(tmp_path, out, info)
    reference, ref_info = _reference_then_clear(recipe, out, info)
    tmpfs.remount("ro")
    with pytest.raises(BuildError, match=r"dataset_info\.json.*Read-only file system"):
        mmdata.build(str(recipe), num_proc=1)
    assert json.loads(info.read_text()) == USER_INFO
    tmpfs.remount("rw")
    mmdata.build(str(recipe), num_proc=1)
    assert snapshot(out) == reference and json.loads(info.read_text()) == ref_info


def test_injected_enospc_at_any_fsync_is_one_error_then_the_rerun_completes_byte_identically(tmp_path, monkeypatch):
    make_source(tmp_path, rows=24)
    out, info = tmp_path / "out", tmp_path / "dataset_info.json"
    info.write_text(json.dumps(USER_INFO))
    recipe = recipe_for(tmp_path, out, info)
    real_fsync = os.fsync
    calls = 0

    def counting_fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    reference, ref_info = _reference_then_clear(recipe, out, info)
    total = calls  # fsyncs happen at every part, marker, dataset_info and manifest write
    assert total >= 8
    for fail_at in sorted({1, 2, total // 3, total // 2, total - 2, total - 1, total}):
        calls = 0

        def failing_fsync(fd: int, fail_at: int = fail_at) -> None:
            nonlocal calls
            calls += 1
            if calls >= fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(BuildError, match="No space left on device"):
            mmdata.build(str(recipe), num_proc=1)
        check_visible_state(out, info, reference, ref_info)
        monkeypatch.setattr(os, "fsync", real_fsync)
        mmdata.build(str(recipe), num_proc=1)
        assert snapshot(out) == reference and json.loads(info.read_text()) == ref_info
        shutil.rmtree(out)
        info.write_text(json.dumps(USER_INFO))
