"""Benchmarks of dedup and leakage (docs/quality.md, benchmarks/README.md "Dedup"):

    python benchmarks/dedup.py --all                  # everything below, then the markdown tables
    python benchmarks/dedup.py --throughput           # build with dedup: exact vs the same build without it
    python benchmarks/dedup.py --near 10000,100000    # dedup: near builds: time, peak memory, precision/recall
    python benchmarks/dedup.py --index                # the near-copy index alone on random 64-bit hashes
    python benchmarks/dedup.py --threshold            # pHash distances of copies vs distinct images per threshold
    python benchmarks/dedup.py --table                # the tables from the last results (benchmarks/.data/)

Inputs are generated (seeded) under the git-ignored ``benchmarks/.data/``:

- ``medtrinity_<N>``: the MedTrinity-shaped parquet of ``benchmarks/run.py`` (512x512 JPEGs, ~65 KB, English
  captions), with 5% of its rows repeated verbatim at random places (so ``dedup: exact`` has work to do);
- ``near_<N>``: N distinct photo-like 256x192 JPEGs (random shapes on gradients, or smooth random textures) as
  files plus a CSV, and 10% more rows whose image is a resized, re-encoded or 1-2% cropped copy of an earlier one.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from run import DATA, _caption, _jpeg_pool, _run_cli, _write_hf_parquet, fresh, machine, timed  # noqa: E402

RESULTS = DATA / "dedup_results.json"
OUT = DATA / "out_dedup"


# ----------------------------------------------------------------------------------------------- data


def medtrinity_with_repeats(rows: int) -> Path:
    folder = DATA / f"medtrinity_dups_{rows}"
    if folder.is_dir():
        return folder
    rng = random.Random(0)
    pool = _jpeg_pool(64)
    unique = rows - rows // 20
    images = [{"bytes": pool[i % len(pool)], "path": f"{i:08d}.jpg"} for i in range(unique)]
    ids = [f"{i:08d}" for i in range(unique)]
    captions = [_caption(rng, i) for i in range(unique)]
    for _ in range(rows - unique):  # a verbatim repeat of an earlier row, at a random place after it
        src = rng.randrange(len(ids))
        at = rng.randrange(src + 1, len(ids) + 1)
        images.insert(at, images[src])
        ids.insert(at, ids[src])
        captions.insert(at, captions[src])
    _write_hf_parquet(folder, {"image": images, "id": ids, "caption": captions},
                      {"image": {"_type": "Image"}, "id": {"dtype": "string", "_type": "Value"},
                       "caption": {"dtype": "string", "_type": "Value"}})
    import datasets

    datasets.load_dataset(str(folder), split="train")  # the Arrow cache, built once, not timed
    return folder


def _image(seed: int):
    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    w, h = 256, 192
    if rng.random() < 0.7:
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randrange(4, 12)):
            x, y = rng.randrange(w), rng.randrange(h)
            box = (x, y, x + rng.randrange(10, w // 2), y + rng.randrange(10, h // 2))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.randrange(256)
                                                                                     for _ in range(3)))
        return img
    noise = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC)


def _copy(img, rng: random.Random):
    from PIL import Image

    w, h = img.size
    kind = rng.choice(["resize", "reencode", "crop"])
    if kind == "resize":
        s = rng.uniform(0.5, 0.8)
        img = img.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS)
    elif kind == "crop":
        dx, dy = max(1, int(w * rng.uniform(0.01, 0.02))), max(1, int(h * rng.uniform(0.01, 0.02)))
        img = img.crop((dx, dy, w - dx, h - dy))
    return img, rng.randrange(60, 86)


def _write_image(job: tuple[Path, int, int | None]) -> None:
    path, seed, copy_seed = job
    img = _image(seed)
    quality = 90
    if copy_seed is not None:
        img, quality = _copy(img, random.Random(copy_seed))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    path.write_bytes(buf.getvalue())


def near_dataset(n: int) -> tuple[Path, set[int]]:
    """``n`` distinct images plus ``n // 10`` near copies (rows after their original); returns the copies' rows."""
    folder = DATA / f"near_{n}"
    truth_file = folder / "copies.json"
    if truth_file.is_file():
        return folder, set(json.loads(truth_file.read_text()))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(n)
    rows: list[tuple[str, int | None]] = [(f"{i:07d}.jpg", None) for i in range(n)]
    jobs = [(folder / "images" / name, i, None) for i, (name, _) in enumerate(rows)]
    for k in range(n // 10):  # a copy of a random image, at a random place after the image itself
        at = rng.randrange(len(rows))
        while rows[at][1] is not None:
            at = rng.randrange(len(rows))
        src = int(rows[at][0][:-4])
        name = f"c{k:07d}.jpg"
        jobs.append((folder / "images" / name, src, k))
        rows.insert(rng.randrange(at + 1, len(rows) + 1), (name, src))
    with multiprocessing.get_context("fork").Pool() as pool:
        pool.map(_write_image, jobs, chunksize=256)
    copies = [i for i, (_, src) in enumerate(rows) if src is not None]
    lines = ["image_path,caption"] + [f"images/{name},caption {i}" for i, (name, _) in enumerate(rows)]
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    truth_file.write_text(json.dumps(copies))
    return folder, set(copies)


def write_recipe(path: Path, data: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------------------------- figures


def throughput(rows: int, repeat: int) -> dict:
    """The same MedTrinity-shaped build (2 workers, copy, a 5% val split) without dedup, with ``dedup: exact`` and
    with ``dedup: exact`` + ``split.group_by: image``, in interleaved rounds; ratios are paired per round."""
    import mmdata

    folder = medtrinity_with_repeats(rows)
    base = {"source": {"type": "hf", "path": str(folder)}, "fields": {"image": "image", "answer": "caption",
                                                                     "id": "id"},
            "prompt": "<image>What is the diagnosis shown in this medical image?", "split": {"val": 0.05}}
    variants = {"no dedup": {}, "dedup: exact": {"dedup": "exact"},
                "dedup: exact + group_by: image": {"dedup": "exact", "split": {"val": 0.05, "group_by": "image"}}}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    counts = {}
    for _ in range(repeat):
        for name, extra in variants.items():
            out = fresh(OUT / "throughput")
            path = write_recipe(DATA / "recipes" / "dedup_throughput.yaml",
                                {"name": "dt", **base, **extra, "output": {"dir": str(out), "shard_size": 1000}})
            result, seconds = timed(lambda p=path: mmdata.build(str(p), num_proc=2, quiet=True))
            runs[name].append(rows / seconds)
            counts[name] = {"written": result.written, "rejected": result.rejected}
    plain = runs["no dedup"]
    return {"rows": rows, "repeat": repeat, "machine": machine(), "counts": counts,
            "records_per_s": {name: [round(x) for x in v] for name, v in runs.items()},
            "vs_no_dedup": {name: round(statistics.median(a / b for a, b in zip(v, plain, strict=True)), 3)
                            for name, v in runs.items()}}


def near(sizes: list[int]) -> list[dict]:
    """``dedup: near`` builds of files + CSV (2 workers): wall time and peak memory from a subprocess, the
    finalize-side index timed alone from the staged fingerprints, precision/recall vs the planted copies."""
    from mmdata.dedup import find_duplicates, load_task_fingerprints
    from mmdata.layout import Layout
    from mmdata.recipes import load_recipe

    results = []
    for n in sizes:
        folder, copies = near_dataset(n)
        row = {"images": n, "copies": len(copies), "rows": n + len(copies)}
        for label, extra in (("no dedup", {}), ("dedup: near", {"dedup": "near"})):
            out = fresh(OUT / f"near_{n}")
            path = write_recipe(DATA / "recipes" / f"near_{n}.yaml", {
                "name": "near", "source": {"type": "csv", "path": str(folder / "train.csv")},
                "fields": {"image": "image_path", "answer": "caption"}, "prompt": "<image>Describe the image.", **extra,
                "output": {"dir": str(out), "shard_size": 2000}})
            run = _run_cli(["build", str(path), "--num-proc", "2", "--set", f"output.dir={out}"])
            row[label] = {k: run[k] for k in ("seconds", "peak_rss_main_mb", "peak_pss_tree_mb")}
        layout = Layout.for_recipe(load_recipe(str(path), {"output.dir": str(out)}))
        num_tasks = len(list((out / ".mmdata" / "done").glob("*.json")))
        import tracemalloc

        tracemalloc.start()
        started = time.perf_counter()
        fp = load_task_fingerprints(layout, num_tasks)
        found = find_duplicates(fp, "near")
        row["index_seconds"] = round(time.perf_counter() - started, 2)
        row["index_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
        dropped = set(fp.position[found.duplicate_of >= 0].tolist())
        tp = len(dropped & copies)
        row["precision"] = round(tp / max(1, len(dropped)), 4)
        row["recall"] = round(tp / max(1, len(copies)), 4)
        row["dropped"] = len(dropped)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def index(sizes: list[int], thresholds: list[int]) -> list[dict]:
    """The near-copy index alone (:func:`mmdata.dedup.image_labels`: distinct values, multi-index hashing,
    components) on uniform random 64-bit hashes with 10% planted copies at 0-10 flipped bits."""
    import tracemalloc

    import numpy as np

    from mmdata.dedup import _plan, image_labels

    out = []
    for threshold in thresholds:
        for n in sizes:
            rng = np.random.default_rng(n)
            base = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(1)
            flips = np.zeros(n // 10, dtype=np.uint64)
            for j in range(len(flips)):
                for b in rng.choice(64, rng.integers(0, 11), replace=False):
                    flips[j] |= np.uint64(1) << np.uint64(int(b))
            hashes = np.concatenate([base, base[rng.integers(0, n, n // 10)] ^ flips])
            images = np.arange(len(hashes), dtype=np.uint64)
            tracemalloc.start()
            started = time.perf_counter()
            labels = image_labels(images, hashes, threshold)
            seconds = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            sizes_bits, radius = _plan(len(hashes), threshold)
            row = {"threshold": threshold, "hashes": len(hashes), "seconds": round(seconds, 2),
                   "peak_mb": round(peak / 2**20, 1), "clusters": int(len(np.unique(labels))),
                   "plan": f"{len(sizes_bits)} chunks of {min(sizes_bits)}-{max(sizes_bits)} bits, radius {radius}"}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def threshold_table(n: int = 400) -> dict:
    """pHash distances of resized / re-encoded / cropped copies to their original, and between distinct images, for
    photo-like images and for blocky pure noise; per threshold, the share of copies found and the distinct pairs
    taken for copies, by the 64-bit hash alone and with the 256-bit confirmation that ``dedup: near`` applies."""
    import numpy as np
    from PIL import Image

    from mmdata.dedup import FINE_PER_BIT, perceptual_hash, popcount

    def encode(img, q=90, fmt="JPEG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": q} if fmt == "JPEG" else {}))
        return buf.getvalue()

    def crop(im, pct):
        dx, dy = max(1, im.width * pct // 100), max(1, im.height * pct // 100)
        return im.crop((dx, dy, im.width - dx, im.height - dy))

    transforms = {
        "re-encode q50": lambda im: encode(im, 50), "re-encode q30": lambda im: encode(im, 30),
        "PNG": lambda im: encode(im, fmt="PNG"),
        "resize 50%": lambda im: encode(im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS), 85),
        "resize 75%": lambda im: encode(im.resize((im.width * 3 // 4, im.height * 3 // 4)), 80),
        "resize 130%": lambda im: encode(im.resize((im.width * 13 // 10, im.height * 13 // 10)), 90),
        "crop 1%": lambda im: encode(crop(im, 1), 88),
        "crop 2%": lambda im: encode(crop(im, 2), 88),
        "crop 2% + resize 60% + q60": lambda im: encode(crop(im, 2).resize((im.width * 6 // 10, im.height * 6 // 10)),
                                                        60),
    }
    families = {
        "photo-like (shapes, smooth textures)": lambda i: _image(10_000 + i),
        "pure noise": lambda i: Image.merge("RGB", [Image.fromarray(np.random.default_rng(i * 3 + c).integers(
            0, 256, (64, 80), dtype=np.uint8)) for c in range(3)]).resize((240, 192), Image.Resampling.NEAREST),
    }

    def split(h):
        return h[..., 0], h[..., 1:]

    out = {}
    for family, make in families.items():
        originals = [make(i) for i in range(n)]
        hashes = np.array([perceptual_hash(encode(im)) for im in originals], dtype=np.uint64)
        coarse, fine = split(hashes)
        per_copy = {}
        for name, t in transforms.items():
            c, f = split(np.array([perceptual_hash(t(im)) for im in originals], dtype=np.uint64))
            per_copy[name] = (popcount(coarse ^ c), popcount(fine ^ f).sum(axis=1))
        iu = np.triu_indices(n, 1)
        pair_coarse = popcount(coarse[:, None] ^ coarse[None, :])[iu]
        pair_fine = popcount(fine[:, None, :] ^ fine[None, :, :]).sum(axis=2)[iu]
        all_coarse = np.concatenate([d for d, _ in per_copy.values()])
        all_fine = np.concatenate([f for _, f in per_copy.values()])
        out[family] = {
            "per_transform": {k: {"mean": round(float(d.mean()), 2), "p95": float(np.percentile(d, 95)),
                                  "max": int(d.max()), "fine_p95": float(np.percentile(f, 95))}
                              for k, (d, f) in per_copy.items()},
            "distinct_pairs": {"pairs": int(pair_coarse.size), "min": int(pair_coarse.min()),
                               "p0.1": float(np.percentile(pair_coarse, 0.1)),
                               "mean": round(float(pair_coarse.mean()), 1)},
            "by_threshold": {t: {"recall_coarse": round(float((all_coarse <= t).mean()), 4),
                                 "recall": round(float(((all_coarse <= t) & (all_fine <= FINE_PER_BIT * t)).mean()), 4),
                                 "distinct_pairs_within_coarse": int((pair_coarse <= t).sum()),
                                 "distinct_pairs_near": int(((pair_coarse <= t) & (pair_fine <= FINE_PER_BIT * t)).sum())}
                             for t in (4, 6, 8, 10, 12)},
        }
    # formula images (text lines on white): distinct images whose coarse pHashes are close
    latex = HERE.parent.parent / "shared" / "fixtures" / "hub" / "linxy--LaTeX_OCR"
    if latex.is_dir():
        import pyarrow.parquet as pq

        blobs = list(dict.fromkeys(r["bytes"] for f in sorted(latex.rglob("*.parquet"))
                                   for r in pq.read_table(f).column("image").to_pylist()))
        coarse, fine = split(np.array([perceptual_hash(b) for b in blobs], dtype=np.uint64))
        iu = np.triu_indices(len(blobs), 1)
        pc = popcount(coarse[:, None] ^ coarse[None, :])[iu]
        pf = popcount(fine[:, None, :] ^ fine[None, :, :]).sum(axis=2)[iu]
        out["LaTeX_OCR formulas (distinct)"] = {"images": len(blobs), "pairs": int(pc.size), "by_threshold": {
            t: {"distinct_pairs_within_coarse": int((pc <= t).sum()),
                "distinct_pairs_near": int(((pc <= t) & (pf <= FINE_PER_BIT * t)).sum())} for t in (4, 6, 8, 10, 12)}}
    return out


def speed_of_hashes(n: int = 200) -> dict:
    """Per-image cost on 512x512 MedTrinity-shaped JPEGs: sha256, a full decode, this pHash, imagehash's (if
    installed)."""
    from PIL import Image

    from mmdata.dedup import perceptual_hash

    pool = _jpeg_pool(n)
    out = {}

    def per_image(fn) -> float:
        started = time.perf_counter()
        for data in pool:
            fn(data)
        return round((time.perf_counter() - started) / len(pool) * 1e3, 3)

    import hashlib

    out["sha256 of the bytes (copy mode names files with it anyway)"] = per_image(lambda d: hashlib.sha256(d).digest())
    out["full decode (PIL)"] = per_image(lambda d: Image.open(io.BytesIO(d)).load())
    out["mmdata.dedup.perceptual_hash (JPEG draft decode; 64 + 256 bits)"] = per_image(perceptual_hash)
    try:
        import imagehash

        out["imagehash.phash (full decode, scipy DCT)"] = per_image(lambda d: imagehash.phash(Image.open(io.BytesIO(d))))
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------------------------- tables


def tables(results: dict) -> str:
    lines = []
    m = results.get("machine") or {}
    if m:
        lines.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GB RAM, Python "
                     f"{m.get('python')} (load average at start {m.get('load_avg_at_start')}).\n")
    t = results.get("throughput")
    if t:
        lines += [f"Build throughput, MedTrinity-shaped, {t['rows']:,} rows (5% verbatim repeats), 2 workers, "
                  f"copy, {t['repeat']} interleaved rounds:", "",
                  "| build | records/s per round | vs no dedup (paired median) | written | rejected |",
                  "|---|---|---:|---:|---:|"]
        for name, runs in t["records_per_s"].items():
            c = t["counts"][name]
            lines.append(f"| {name} | {', '.join(map(str, runs))} | {100 * t['vs_no_dedup'][name]:.0f}% | "
                         f"{c['written']:,} | {c['rejected']:,} |")
        lines.append("")
    if results.get("near"):
        lines += ["`dedup: near` builds (files + CSV, 256x192 JPEGs, 10% near copies, 2 workers):", "",
                  "| images + copies | build, no dedup | build, dedup: near | peak PSS, no dedup / near | near index "
                  "(finalize) | index peak memory | precision | recall |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["near"]:
            lines.append(f"| {r['images']:,} + {r['copies']:,} | {r['no dedup']['seconds']} s | "
                         f"{r['dedup: near']['seconds']} s | {r['no dedup']['peak_pss_tree_mb']:.0f} / "
                         f"{r['dedup: near']['peak_pss_tree_mb']:.0f} MB | {r['index_seconds']} s | "
                         f"{r['index_peak_mb']} MB | {r['precision']:.4f} | {r['recall']:.4f} |")
        lines.append("")
    if results.get("index"):
        lines += ["Near-copy index alone (`image_labels`), uniform random 64-bit hashes + 10% planted copies:", "",
                  "| threshold | hashes | time | peak memory (tracemalloc) | plan |", "|---:|---:|---:|---:|---|"]
        for r in results["index"]:
            lines.append(f"| {r['threshold']} | {r['hashes']:,} | {r['seconds']} s | {r['peak_mb']} MB | "
                         f"{r['plan']} |")
        lines.append("")
    if results.get("speed"):
        lines += ["Per image, 512x512 JPEG (~65 KB):", "", "| step | ms |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in results["speed"].items()]
        lines.append("")
    if results.get("threshold"):
        for family, d in results["threshold"].items():
            lines += [f"pHash distances, {family}:", ""]
            if "per_transform" in d:
                lines += ["| copy | 64-bit mean | p95 | max | 256-bit p95 |", "|---|---:|---:|---:|---:|"]
                lines += [f"| {k} | {v['mean']} | {v['p95']:g} | {v['max']} | {v['fine_p95']:g} |"
                          for k, v in d["per_transform"].items()]
                p = d["distinct_pairs"]
                lines += ["", f"Distinct pairs: {p['pairs']:,}; 64-bit distance min {p['min']}, 0.1th percentile "
                              f"{p['p0.1']:g}, mean {p['mean']}.", ""]
                lines += ["| threshold | copies found, 64-bit only | copies found, + 256-bit check | distinct pairs "
                          "within, 64-bit only | distinct pairs taken, + 256-bit check |", "|---:|---:|---:|---:|---:|"]
                lines += [f"| {k} | {v['recall_coarse']:.4f} | {v['recall']:.4f} | {v['distinct_pairs_within_coarse']}"
                          f" | {v['distinct_pairs_near']} |" for k, v in d["by_threshold"].items()]
            else:
                lines += [f"{d['images']} distinct images, {d['pairs']:,} pairs.", "",
                          "| threshold | distinct pairs within, 64-bit only | + 256-bit check |", "|---:|---:|---:|"]
                lines += [f"| {k} | {v['distinct_pairs_within_coarse']} | {v['distinct_pairs_near']} |"
                          for k, v in d["by_threshold"].items()]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--near", default=None, help="image counts, e.g. 10000,100000")
    parser.add_argument("--index", action="store_true")
    parser.add_argument("--index-sizes", default="10000,30000,100000,300000")
    parser.add_argument("--threshold", action="store_true")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / ".gitignore").write_text("*\n")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.table:
        results["machine"] = machine()
    if args.all or args.throughput:
        results["throughput"] = throughput(args.rows, args.repeat)
    if args.all or args.near:
        results["near"] = near([int(x) for x in (args.near or "10000,30000,100000").split(",")])
    if args.all or args.index:
        sizes = [int(x) for x in args.index_sizes.split(",")]
        results["index"] = index(sizes, [6, 10])
    if args.all or args.threshold:
        results["threshold"] = threshold_table()
        results["speed"] = speed_of_hashes()
    RESULTS.write_text(json.dumps(results, indent=2))
    print(tables(results))


if __name__ == "__main__":
    main()
