"""Benchmarks for the README table: mmdata vs the two tutorial baselines vs the disk's physical limit.

    python benchmarks/run.py --all            # generate data, run every figure, print the markdown tables
    python benchmarks/run.py --throughput     # one figure group (also: --rss, --resume, --noop)
    python benchmarks/run.py --table          # the README tables from the last results.json

Data is generated (seeded) under ``benchmarks/.data/`` (git-ignored):

- ``medtrinity/``: the MedTrinity-25M demo layout, parquet with ``image`` (512x512 JPEG, ~75 KB) / ``id`` /
  ``caption`` (English paragraph), read through the ``hf`` source like the real dataset;
- ``latex_ocr/``: the linxy/LaTeX_OCR layout, parquet with ``image`` (small PNG formulas) / ``text``;
- ``medtrinity_files/``: the same JPEGs as files plus a CSV (the file-based layout ``images: link`` is for);
- ``text_<N>.csv``: text-only rows for the memory figure (RSS is about records, not image bytes).

Every timed run ends with ``os.sync()`` inside the timing, so the figures are bytes on disk, not in the page cache.
Sizes: ``--rows`` (default 10000) for throughput/resume, ``--rss-rows`` (default 100000,1000000) for memory;
each throughput contender runs ``--repeat`` times (default 3) and the best run counts (median reported too).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
OUT = DATA / "out"
RESULTS = DATA / "results.json"
PROMPT = "What is the diagnosis shown in this medical image?"
WORDS = ("lesion opacity nodule region left right lobe axial sagittal coronal scan contrast enhancement mass density "
         "hyperintense hypointense margin tissue cortex ventricle consistent with inflammation edema fracture").split()


# ----------------------------------------------------------------------------------------------- data


def _jpeg_pool(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct 512x512 textured JPEGs of ~75 KB (noise keeps them from compressing to nothing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        base = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((512, 512), Image.BICUBIC)
        noisy = np.asarray(base).astype(np.int16) + rng.integers(-12, 12, (512, 512, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=78)
        pool.append(buf.getvalue())
    return pool


def _caption(rng: random.Random, i: int) -> str:
    return f"The image {i} is a CT scan of the chest. " + " ".join(rng.choice(WORDS) for _ in range(60)) + "."


def _write_hf_parquet(folder: Path, columns: dict, features: dict, rows_per_file: int = 2000) -> None:
    """Parquet files in hub layout (``data/train-XXXXX-of-YYYYY.parquet``) with HF feature metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True, exist_ok=True)
    total = len(next(iter(columns.values())))
    files = max(1, -(-total // rows_per_file))
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    for k in range(files):
        part = {name: values[k * rows_per_file:(k + 1) * rows_per_file] for name, values in columns.items()}
        table = pa.table(part).replace_schema_metadata(meta)
        pq.write_table(table, folder / "data" / f"train-{k:05d}-of-{files:05d}.parquet", row_group_size=500)


def generate(rows: int, rss_rows: list[int]) -> dict:
    """Write every input (skipping those already there) and warm the ``datasets`` cache shared by all readers."""
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / ".gitignore").write_text("*\n")
    timings = {}
    rng = random.Random(0)
    med = DATA / f"medtrinity_{rows}"
    if not med.is_dir():
        pool = _jpeg_pool(64)
        _write_hf_parquet(med, {
            "image": [{"bytes": pool[i % len(pool)], "path": f"{i:08d}.jpg"} for i in range(rows)],
            "id": [f"{i:08d}" for i in range(rows)],
            "caption": [_caption(rng, i) for i in range(rows)],
        }, {"image": {"_type": "Image"}, "id": {"dtype": "string", "_type": "Value"},
            "caption": {"dtype": "string", "_type": "Value"}})
    files = DATA / f"medtrinity_files_{rows}"
    if not files.is_dir():
        pool = _jpeg_pool(64)
        (files / "images").mkdir(parents=True)
        lines = ["image_path,caption"]
        for i in range(rows):
            (files / "images" / f"{i:08d}.jpg").write_bytes(pool[i % len(pool)])
            lines.append(f"images/{i:08d}.jpg,{_caption(rng, i)}")
        (files / "train.csv").write_text("\n".join(lines) + "\n")
    latex = DATA / f"latex_ocr_{rows}"
    if not latex.is_dir():
        sys.path.insert(0, str(HERE.parent / "src"))
        from mmdata.sources.synthetic_latex import render_formula

        formulas_file = HERE.parent / "recipes" / "data" / "latex_formulas.txt"
        formulas = [f for f in formulas_file.read_text().splitlines() if f.strip()]
        pngs = [render_formula(f) for f in formulas]
        _write_hf_parquet(latex, {
            "image": [{"bytes": pngs[i % len(pngs)], "path": f"{i}.png"} for i in range(rows)],
            "text": [formulas[i % len(formulas)] for i in range(rows)],
        }, {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}})
    for n in rss_rows:
        path = DATA / f"text_{n}.csv"
        if not path.exists():
            with open(path, "w") as f:
                f.write("question,answer\n")
                for i in range(n):
                    f.write(f"What does scan {i} show?,{_caption(rng, i)}\n")
    import datasets

    for folder in (med, latex):  # the Arrow cache every datasets-based reader shares (timed once, reported apart)
        t = time.perf_counter()
        datasets.load_dataset(str(folder), split="train")
        timings[f"datasets cache {folder.name}"] = time.perf_counter() - t
    return timings


# ----------------------------------------------------------------------------------------------- the contenders


def limit(parquet_folder: Path, out: Path, image_column: str, text_column: str, ext: str) -> int:
    """The physical limit: read the parquet, write each encoded image and one JSONL line. No decoding, no checks."""
    import pyarrow.parquet as pq

    (out / "data").mkdir(parents=True)
    n = 0
    with open(out / "data" / "train.jsonl", "w", encoding="utf-8") as jsonl:
        for file in sorted((parquet_folder / "data").glob("*.parquet")):
            for batch in pq.ParquetFile(file).iter_batches(batch_size=256, columns=[image_column, text_column]):
                for image, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                    folder = out / "images" / f"{n // 10000:05d}"
                    if n % 10000 == 0:
                        folder.mkdir(parents=True)
                    path = folder / f"{n:09d}_0.{ext}"
                    with open(path, "wb") as f:
                        f.write(image["bytes"])
                    jsonl.write(json.dumps({"messages": [{"role": "user", "content": "<image>" + PROMPT},
                                                         {"role": "assistant", "content": text}],
                                            "images": [str(path.relative_to(out))]}, ensure_ascii=False) + "\n")
                    n += 1
    return n


def limit_files(csv_folder: Path, out: Path) -> int:
    """The copy limit for file-based sources: read each image file, write its bytes, one JSONL line per row."""
    import csv

    (out / "images").mkdir(parents=True)
    n = 0
    with open(csv_folder / "train.csv", encoding="utf-8") as f, open(out / "train.jsonl", "w") as jsonl:
        for row in csv.DictReader(f):
            path = out / "images" / f"{n:09d}_0.jpg"
            path.write_bytes((csv_folder / row["image_path"]).read_bytes())
            jsonl.write(json.dumps({"messages": [{"role": "user", "content": "<image>" + PROMPT},
                                                 {"role": "assistant", "content": row["caption"]}],
                                    "images": [str(path.relative_to(out))]}, ensure_ascii=False) + "\n")
            n += 1
    return n


def baseline_a(parquet_folder: Path, out: Path, text_column: str, ext: str) -> int:
    """Tutorial (a): iterate a ``datasets`` dataset, ``image.save()`` each decoded PIL image, append to a list,
    one ``json.dump`` at the end."""
    import datasets

    ds = datasets.load_dataset(str(parquet_folder), split="train")
    (out / "images").mkdir(parents=True)
    records = []
    for i, row in enumerate(ds):
        path = out / "images" / f"{i}.{ext}"
        row["image"].save(path)
        records.append({"messages": [{"role": "user", "content": "<image>" + PROMPT},
                                     {"role": "assistant", "content": row[text_column]}], "images": [str(path)]})
    with open(out / "train.json", "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=2)
    return len(records)


def baseline_b(parquet_folder: Path, out: Path, text_column: str, ext: str) -> int:
    """Tutorial (b): save the images, write a CSV with pandas, then convert the CSV into a JSON list."""
    import datasets
    import pandas as pd

    ds = datasets.load_dataset(str(parquet_folder), split="train")
    (out / "images").mkdir(parents=True)
    rows = []
    for i, row in enumerate(ds):
        path = out / "images" / f"{i}.{ext}"
        row["image"].save(path)
        rows.append({"image_path": str(path), "text": row[text_column]})
    pd.DataFrame(rows).to_csv(out / "train.csv", index=False)
    df = pd.read_csv(out / "train.csv")
    records = [{"messages": [{"role": "user", "content": "<image>" + PROMPT},
                             {"role": "assistant", "content": r["text"]}], "images": [r["image_path"]]}
               for r in df.to_dict(orient="records")]
    with open(out / "train.json", "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=2)
    return len(records)


def recipe(path: Path, source: dict, fields: dict, out: Path, **extra) -> Path:
    import yaml

    data = {"name": path.stem, "source": source, "fields": fields, "prompt": "<image>" + PROMPT,
            "output": {"dir": str(out), "shard_size": 1000}, **extra}
    data = {k: v for k, v in data.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def hf_recipe(name: str, folder: Path, text_column: str, out: Path, **extra) -> Path:
    return recipe(DATA / "recipes" / f"{name}.yaml", {"type": "hf", "path": str(folder)},
                  {"image": "image", "answer": text_column}, out, **extra)


def mmdata_build(recipe_path: Path, num_proc: int, **overrides) -> int:
    import mmdata

    return mmdata.build(str(recipe_path), num_proc=num_proc, quiet=True, **overrides).written


def timed(fn, *args, **kwargs) -> tuple[int, float]:
    os.sync()
    start = time.perf_counter()
    n = fn(*args, **kwargs)
    os.sync()
    return n, time.perf_counter() - start


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


# ----------------------------------------------------------------------------------------------- figures


def throughput(rows: int, repeat: int) -> list[dict]:
    """Each group of contenders runs ``repeat`` rounds, interleaved (limit, baselines, mmdata, limit, ...), each run
    into a fresh folder. On a shared machine the disk's speed drifts, so every run is also compared with the limit's
    run of the *same round*: ``vs_limit`` is the median of those paired ratios."""
    OUT.mkdir(parents=True, exist_ok=True)
    groups = []
    for dataset, folder, text, ext in (("MedTrinity-shaped", DATA / f"medtrinity_{rows}", "caption", "jpg"),
                                       ("LaTeX_OCR-shaped", DATA / f"latex_ocr_{rows}", "text", "png")):
        group = [("limit: bare write of bytes + JSONL", limit, (folder, OUT / "limit", "image", text, ext)),
                 ("baseline (a): datasets + save + json.dump", baseline_a, (folder, OUT / "a", text, ext)),
                 ("baseline (b): save + pandas CSV -> JSON", baseline_b, (folder, OUT / "b", text, ext))]
        for verify in ("header", "decode"):
            for num_proc in (1, 2):
                r = hf_recipe(f"bench_{text}_{verify}_{num_proc}", folder, text, OUT / "mmdata",
                              images={"verify": verify})
                group.append((f"mmdata, {num_proc} worker(s), verify: {verify}", mmdata_build, (r, num_proc)))
        groups.append((dataset, group))
    files = DATA / f"medtrinity_files_{rows}"
    group = [("limit: read + write each file + JSONL", limit_files, (files, OUT / "limit"))]
    for mode in ("copy", "link"):
        r = recipe(DATA / "recipes" / f"files_{mode}.yaml", {"type": "csv", "path": str(files / "train.csv")},
                   {"image": "image_path", "answer": "caption"}, OUT / "mmdata",
                   images={"mode": mode, "verify": "header"})
        group.append((f"mmdata, 2 workers, images: {mode}", mmdata_build, (r, 2)))
    groups.append(("MedTrinity files", group))

    results = []
    for dataset, group in groups:
        times: dict[str, list[float]] = {name: [] for name, _, _ in group}
        counts = {}
        for round_ in range(repeat):
            for name, fn, args in group:
                for child in OUT.iterdir():
                    shutil.rmtree(child)
                counts[name], seconds = timed(fn, *args)
                times[name].append(round(seconds, 2))
                print(f"  round {round_ + 1}  {dataset:<18} {name:<42} {seconds:7.2f} s", flush=True)
        limit_times = times[group[0][0]]
        for name, _, _ in group:
            n, t = counts[name], times[name]
            ratios = sorted(lt / x for lt, x in zip(limit_times, t, strict=True))
            results.append({"dataset": dataset, "method": name, "records": n, "seconds": t,
                            "records_per_s_median": round(n / sorted(t)[len(t) // 2], 1),
                            "records_per_s_best": round(n / min(t), 1),
                            "vs_limit": round(ratios[len(ratios) // 2], 3)})
            print(f"  {dataset:<18} {name:<42} median {results[-1]['records_per_s_median']:7.1f} rec/s  "
                  f"best {results[-1]['records_per_s_best']:7.1f}  vs limit {results[-1]['vs_limit']:.0%}", flush=True)
    for child in OUT.iterdir():
        shutil.rmtree(child)
    return results


def _run_cli(args: list[str], kill_at: float | None = None, total_tasks: int = 0) -> dict:
    """Run ``mmdata`` in a subprocess; sample its peak RSS and the peak PSS sum of its process tree (main + workers);
    optionally kill -9 at a fraction of the tasks."""
    import psutil

    command = [sys.executable, "-m", "mmdata.cli", *args, "--quiet"]
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    done = None
    if kill_at is not None:
        done = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output.dir="))) / ".mmdata" / "done"
    while proc.poll() is None:
        try:
            main_rss = ps.memory_info().rss
            # PSS: pages shared by the forked workers are split between them, so the sum is not double-counted.
            tree = sum(p.memory_full_info().pss for p in (ps, *ps.children(recursive=True)))
        except psutil.Error:
            break
        peak_main, peak_tree = max(peak_main, main_rss), max(peak_tree, tree)
        if done is not None and done.is_dir() and len(os.listdir(done)) >= kill_at * total_tasks:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    os.sync()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"mmdata {' '.join(args)} failed:\n{stderr}")
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_main_mb": round(peak_main / 2**20, 1),
            "peak_pss_tree_mb": round(peak_tree / 2**20, 1), "returncode": proc.returncode, "stdout": stdout}


def rss(rss_rows: list[int]) -> list[dict]:
    results = []
    for n in rss_rows:
        out = fresh(OUT / f"text_{n}")
        r = recipe(DATA / "recipes" / f"text_{n}.yaml", {"type": "csv", "path": str(DATA / f"text_{n}.csv")},
                   {"question": "question", "answer": "answer"}, out, split={"val": 0.01}, prompt=None)
        r.write_text(r.read_text().replace("shard_size: 1000", "shard_size: 10000"))  # the default task size
        res = _run_cli(["build", str(r), "--num-proc", "2"])
        results.append({"records": n, **{k: v for k, v in res.items() if k != "stdout"}})
        print(f"  rss {n:>8} records: main {res['peak_rss_main_mb']} MB, main+workers {res['peak_pss_tree_mb']} MB, "
              f"{res['seconds']} s", flush=True)
    return results


def resume(rows: int) -> dict:
    """kill -9 at ~50% of the tasks, rerun, compare with an uninterrupted build (byte for byte, outside .mmdata)."""
    folder = DATA / f"medtrinity_{rows}"
    full, killed = fresh(OUT / "full"), fresh(OUT / "killed")
    r = hf_recipe("bench_resume", folder, "caption", full, images={"verify": "header"})
    r.write_text(r.read_text().replace("shard_size: 1000", "shard_size: 100"))
    uninterrupted = _run_cli(["build", str(r), "--num-proc", "2"])
    tasks = -(-rows // 100)
    first = _run_cli(["build", str(r), "--num-proc", "2", "--set", f"output.dir={killed}"], kill_at=0.5,
                     total_tasks=tasks)
    finished = len(os.listdir(killed / ".mmdata" / "done"))
    second = _run_cli(["build", str(r), "--num-proc", "2", "--set", f"output.dir={killed}"])
    identical = _tree(full) == _tree(killed)
    result = {"rows": rows, "uninterrupted_s": uninterrupted["seconds"], "killed_after_s": first["seconds"],
              "killed_returncode": first["returncode"], "tasks_done_at_kill": f"{finished}/{tasks}",
              "resume_s": second["seconds"], "byte_identical": identical}
    print(f"  resume: {result}", flush=True)
    shutil.rmtree(full), shutil.rmtree(killed)
    return result


def _tree(root: Path) -> dict:
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


def noop(rss_rows: list[int]) -> dict:
    """Rerun the unchanged 100k build (left by ``--rss``, rebuilt if missing): time to say "up to date"."""
    n = 100_000 if 100_000 in rss_rows else rss_rows[0]
    r = DATA / "recipes" / f"text_{n}.yaml"
    out = OUT / f"text_{n}"
    if not (out / "mmdata_build.json").exists():
        rss([n])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    res = _run_cli(["build", str(r)])
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = {"records": n, "seconds": res["seconds"], "up_to_date": "up to date" in res["stdout"],
              "files_touched": sum(1 for p in after if before.get(p) != after[p])}
    print(f"  no-op: {result}", flush=True)
    return result


def machine() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "os": platform.platform(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def table(results: dict) -> str:
    """The README tables, from ``results.json``."""
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, Python {m['python']}, {m['os']} "
             f"(load average at start {m['load_avg_at_start']}).", ""]
    if "throughput" in results:
        rows = results["throughput"][0]["records"]
        lines += [f"Throughput, {rows} records per run, {len(results['throughput'][0]['seconds'])} interleaved rounds:",
                  "", "| input | method | records/s (median) | records/s (best) | vs limit (paired median) |",
                  "|---|---|---:|---:|---:|"]
        for r in results["throughput"]:
            lines.append(f"| {r['dataset']} | {r['method']} | {r['records_per_s_median']:.0f} | "
                         f"{r['records_per_s_best']:.0f} | {r['vs_limit']:.0%} |")
        lines.append("")
    if "rss" in results:
        lines += ["| records (text-only, 2 workers) | peak RSS, main process | peak PSS, main + workers | time |",
                  "|---:|---:|---:|---:|"]
        for r in results["rss"]:
            lines.append(f"| {r['records']:,} | {r['peak_rss_main_mb']:.0f} MB | {r['peak_pss_tree_mb']:.0f} MB | "
                         f"{r['seconds']:.1f} s |")
        lines.append("")
    if "resume" in results:
        r = results["resume"]
        lines += ["| resume (MedTrinity-shaped, 2 workers) | |", "|---|---|",
                  f"| uninterrupted build | {r['uninterrupted_s']:.1f} s |",
                  f"| kill -9 after | {r['killed_after_s']:.1f} s ({r['tasks_done_at_kill']} tasks done) |",
                  f"| rerun to finish | {r['resume_s']:.1f} s |",
                  f"| byte-identical to the uninterrupted build | {'yes' if r['byte_identical'] else 'NO'} |", ""]
    if "noop" in results:
        r = results["noop"]
        lines += [f"No-op rebuild of the unchanged {r['records']:,}-record build: {r['seconds']:.2f} s "
                  f"(\"up to date\": {'yes' if r['up_to_date'] else 'NO'}, files touched: {r['files_touched']}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--rss", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--noop", action="store_true")
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--rss-rows", default="100000,1000000")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds of the throughput contenders")
    parser.add_argument("--table", action="store_true", help="print the README tables of the last results and exit")
    args = parser.parse_args()
    rss_rows = [int(x) for x in args.rss_rows.split(",")]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.table:
        print(table(results))
        return
    results["machine"] = machine()
    print("generating data (skipped where present) ...", flush=True)
    results["data"] = {"rows": args.rows, "rss_rows": rss_rows, "prepare_s": generate(args.rows, rss_rows)}
    if args.all or args.throughput:
        results["throughput"] = throughput(args.rows, args.repeat)
    if args.all or args.rss:
        results["rss"] = rss(rss_rows)
    if args.all or args.resume:
        results["resume"] = resume(args.rows)
    if args.all or args.noop:
        results["noop"] = noop(rss_rows)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"results: {RESULTS}\n")
    print(table(results))


if __name__ == "__main__":
    main()
