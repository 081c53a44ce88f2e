"""Scale guarantees: same bytes for any worker count, engine or shard split; kill -9 and resume; no-op reruns."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tests.conftest import write_recipe

import mmdata
from mmdata.cli import main
from mmdata.sources import Source, SourceParams, register_source, source_types


def make_csv_source(root: Path, rows: int) -> Path:
    """The tutorial CSV layout: ``rows`` rows over 8 small JPEGs, plus one corrupt image and one missing file."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (24 + i, 16), (i * 30, 100, 200 - i * 20)).save(buf, format="JPEG")
        (images / f"{i}.jpg").write_bytes(buf.getvalue())
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    lines = ["image_path,text"]
    for i in range(rows):
        image = "images/corrupt.jpg" if i == 5 else "images/missing.jpg" if i == 11 else f"images/{i % 8}.jpg"
        lines.append(f"{image},x_{{{i}}} + \\frac{{{i % 7}}}{{2}}")
    (root / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def make_parquet_source(root: Path, rows: int) -> Path:
    """The MedTrinity demo layout: parquet with an ``image`` {bytes, path} struct, ``id`` and an English caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def jpeg(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (20, 20 + i % 5), (i % 255, 40, 90)).save(buf, format="JPEG")
        return buf.getvalue()

    table = pa.table({
        "image": [{"bytes": jpeg(i), "path": f"{i}.jpg"} for i in range(rows)],
        "id": [f"med-{i:05d}" for i in range(rows)],
        "caption": [f"Axial CT slice {i} showing a lesion in region {i % 9}." for i in range(rows)],
    })
    (root / "data").mkdir(parents=True)
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    return root


def recipe_for(root: Path, kind: str, **output) -> Path:
    source = {"type": "csv", "path": "train.csv"} if kind == "csv" else {"type": "hf", "path": "."}
    fields = {"image": "image_path", "answer": "text"} if kind == "csv" else {"image": "image", "answer": "caption",
                                                                               "id": "id"}
    return write_recipe(root / "recipe.yaml", {
        "name": f"scale_{kind}", "source": source, "fields": fields, "prompt": ["Describe.", "What is shown?"],
        "split": {"val": 5, "test": 3}, "output": {"dir": "out", "shard_size": 7, **output},
    })


@pytest.fixture(scope="module")
def csv_src(tmp_path_factory) -> Path:
    return make_csv_source(tmp_path_factory.mktemp("csv"), 60)


@pytest.fixture(scope="module")
def parquet_src(tmp_path_factory) -> Path:
    return make_parquet_source(tmp_path_factory.mktemp("parquet"), 45)


def tree(root: Path) -> dict[str, bytes]:
    """Every output file's bytes (resume state left out; the manifest without the output folder it names)."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(".mmdata/"):
            data = path.read_bytes()
            if rel == "mmdata_build.json":
                manifest = json.loads(data)
                manifest["recipe"]["output"].pop("dir")
                data = json.dumps(manifest, sort_keys=True).encode()
            files[rel] = data
    return files


def snapshot(root: Path) -> dict[str, tuple]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino, p.stat().st_size)
            for p in root.rglob("*")}


@pytest.mark.parametrize("kind", ["csv", "parquet"])
@pytest.mark.parametrize("file_format", ["jsonl", "json"])
def test_one_and_two_workers_write_identical_bytes(kind, file_format, csv_src, parquet_src, tmp_path):
    recipe = recipe_for(csv_src if kind == "csv" else parquet_src, kind, file_format=file_format)
    one = mmdata.build(str(recipe), num_proc=1, output__dir=str(tmp_path / "p1"))
    two = mmdata.build(str(recipe), num_proc=2, output__dir=str(tmp_path / "p2"))
    assert one.counts == two.counts and one.written > 30
    assert tree(one.output_dir) == tree(two.output_dir)
    if kind == "csv":
        assert one.counts["rejected_by_reason"] == {"image file not found": 1, "image unreadable": 1}


def test_kill_9_mid_build_then_resume_is_byte_identical(tmp_path):
    src = make_csv_source(tmp_path / "src", 1200)
    recipe = recipe_for(src, "csv", shard_size=20)  # 60 tasks
    reference = mmdata.build(str(recipe), num_proc=1, output__dir=str(tmp_path / "reference"))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mmdata.cli", "build", str(recipe), "--num-proc", "2", "--quiet",
               "--set", f"output.dir={out}"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = out / ".mmdata" / "done"
    while proc.poll() is None and len(list(done.glob("*.json")) if done.is_dir() else []) < 30:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # the main process only: its pool workers must die with it
    assert proc.wait() == -signal.SIGKILL, "the build finished before it could be killed"
    finished = len(list(done.glob("*.json")))
    assert 0 < finished < 60 and not (out / "mmdata_build.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert tree(out) == tree(reference.output_dir)


def test_unchanged_rerun_is_a_noop_that_writes_nothing(csv_src, tmp_path, capsys):
    recipe = recipe_for(csv_src, "csv")
    out = tmp_path / "o"
    assert main(["build", str(recipe), "--set", f"output.dir={out}", "--quiet"]) == 0
    before = snapshot(out)
    started = time.perf_counter()
    assert main(["build", str(recipe), "--set", f"output.dir={out}", "--quiet"]) == 0
    assert time.perf_counter() - started < 5
    assert "up to date" in capsys.readouterr().out
    assert snapshot(out) == before


def test_resume_after_a_crash_during_finalise(csv_src, tmp_path):
    """Leftover staging (a half-written split folder) from a crash after all tasks finished is cleared on resume."""
    recipe = recipe_for(csv_src, "csv")
    reference = mmdata.build(str(recipe), num_proc=1, output__dir=str(tmp_path / "reference"))
    out = tmp_path / "o"
    mmdata.build(str(recipe), num_proc=1, output__dir=str(out))
    (out / "mmdata_build.json").unlink()
    (out / "scale_csv_train.tmp").mkdir()
    (out / "scale_csv_train.tmp" / "part-00000.jsonl").write_text("half")
    (out / "rejects.jsonl.tmp").write_text("half")
    again = mmdata.build(str(recipe), num_proc=1, output__dir=str(out))
    assert not again.up_to_date and tree(out) == tree(reference.output_dir)


def test_task_markers_left_without_their_state_file_are_not_resumed(csv_src, tmp_path):
    """A kill while a changed recipe clears the old build (rmtree may remove state.json before the task markers)
    leaves the old recipe's markers behind; the next build must redo those tasks, not resume the old output."""
    old = recipe_for(csv_src, "csv")
    changed = write_recipe(csv_src / "changed.yaml", {**yaml.safe_load(old.read_text()), "prompt": "Caption it."})
    reference = mmdata.build(str(changed), num_proc=1, output__dir=str(tmp_path / "reference"))
    out = tmp_path / "o"
    mmdata.build(str(old), num_proc=1, output__dir=str(out))
    assert any((out / ".mmdata" / "done").iterdir())
    (out / ".mmdata" / "state.json").unlink()  # what the killed clear left: the markers, without their state file
    again = mmdata.build(str(changed), num_proc=1, output__dir=str(out))
    assert not again.up_to_date and tree(out) == tree(reference.output_dir)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_shards_merged_equal_a_single_build(kind, csv_src, parquet_src, tmp_path):
    recipe = recipe_for(csv_src if kind == "csv" else parquet_src, kind)
    single = mmdata.build(str(recipe), num_proc=1, output__dir=str(tmp_path / "single"))
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        result = mmdata.build(str(recipe), num_proc=1, shard=(i, 2), output__dir=str(part))
        assert result.shard == (i, 2) and result.dataset_info is None  # nothing registered for a part
    merged_dir = tmp_path / "merged"
    assert main(["merge", str(merged_dir), *map(str, parts)]) == 0
    assert tree(merged_dir) == tree(single.output_dir)

    # Shards built into one shared folder (one machine per shard, a shared filesystem): merge in place.
    shared = tmp_path / "shared"
    for i in range(2):
        mmdata.build(str(recipe), num_proc=1, shard=(i, 2), output__dir=str(shared))
    assert main(["merge", str(shared)]) == 0
    assert tree(shared) == tree(single.output_dir)


class _CountingParams(SourceParams):
    rows: int


class CountingSource(Source):
    """Random-access rows; records which ranges were read, to show --shard and resume skip rows for free."""

    Params = _CountingParams
    random_access = True
    default_fields = {"question": "q", "answer": "a"}
    reads: list[tuple[int, int]] = []

    def rows(self):
        raise AssertionError("a random-access source is read by range only")

    def num_rows(self) -> int:
        return self.params.rows

    def read_rows(self, start: int, stop: int):
        CountingSource.reads.append((start, stop))
        return ({"q": f"question {i}", "a": f"answer {i}"} for i in range(start, stop))


def test_shard_of_a_random_access_source_reads_only_its_rows(tmp_path):
    source_types()  # built-ins first: the registry loads them only while it is empty
    register_source("test_counting")(CountingSource)
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "count", "source": {"type": "test_counting", "rows": 25},
                                                "output": {"dir": str(tmp_path / "out"), "shard_size": 10}})
    CountingSource.reads.clear()
    mmdata.build(str(recipe), num_proc=1, shard=(1, 2))
    assert CountingSource.reads == [(10, 20)]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_ray_engine_equals_local_engine(kind, local_ray, csv_src, parquet_src, tmp_path):
    recipe = recipe_for(csv_src if kind == "csv" else parquet_src, kind)
    local = mmdata.build(str(recipe), num_proc=2, output__dir=str(tmp_path / "local"))
    on_ray = mmdata.build(str(recipe), num_proc=2, engine="ray", output__dir=str(tmp_path / "ray"))
    assert on_ray.counts == local.counts
    assert tree(on_ray.output_dir) == tree(local.output_dir)
    assert os.listdir(on_ray.output_dir / ".mmdata" / "done")  # per-task markers, as with the local engine


@pytest.mark.parametrize("mode,fmt,options", [
    ("RGB", "JPEG", {}), ("L", "JPEG", {}), ("CMYK", "JPEG", {}), ("RGB", "JPEG", {"progressive": True}),
    ("RGB", "PNG", {}), ("RGBA", "PNG", {}), ("P", "PNG", {}), ("I;16", "PNG", {}), ("1", "PNG", {}),
])
def test_header_check_reads_sizes_like_pil(mode, fmt, options):
    """``verify: header`` reads plain PNG/JPEG headers itself (the copy path's hot spot); it must agree with PIL."""
    from mmdata.images import _plain_header, inspect_image

    buf = io.BytesIO()
    Image.new(mode, (37, 23)).save(buf, format=fmt, **options)
    data = buf.getvalue()
    fast = _plain_header(data)
    assert fast is not None and (fast.format, fast.width, fast.height) == (fmt, 37, 23)
    assert inspect_image(data, "header") == inspect_image(data, "decode")
    for broken in (data[:12], b"\xff\xd8\xff\xe0 not a jpeg", data[:8] + b"\0" * 40):
        assert _plain_header(broken) is None  # anything unusual goes to PIL for the verdict


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_default_header_check_still_rejects_truncated_images(fmt, tmp_path):
    """The default check decodes nothing for a clean file, yet a cut-off download (no end marker) is decoded and
    rejected, from bytes and from a file to link alike."""
    from mmdata.errors import SampleError
    from mmdata.images import inspect_image

    buf = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(buf, format=fmt)
    data = buf.getvalue()
    assert (inspect_image(data).width, inspect_image(data).height) == (64, 48)
    cut = data[: len(data) * 2 // 3]
    (tmp_path / "cut").write_bytes(cut)
    for value in (cut, tmp_path / "cut"):
        with pytest.raises(SampleError, match="readable image|truncated"):
            inspect_image(value)
