"""The report's HTML page: the gallery (thumbnails embedded as data: JPEGs), duplicate clusters side by side,
the counts, distributions, recommendations and rejected examples; self-contained, no script."""

from __future__ import annotations

import base64
import html
import io
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import lfdata
from .._version import __version__
from .build import TEXT_LIMIT, THUMB_SIDE, Build, Record
from .stats import read_image_facts, report_image_path, text_of

# ----------------------------------------------------------------------------------------------- gallery


def thumbnail_data_uri(media_dir: Path, rel: str, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG of the image as a ``data:`` URI (the one place the report decodes images); None if unreadable."""
    from PIL import Image

    try:
        with Image.open(report_image_path(media_dir, rel)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (side, side))
            img.seek(0)
            img.thumbnail((side, side))
            if img.mode in ("RGBA", "LA", "P", "PA"):
                img = img.convert("RGBA")
                canvas = Image.new("RGB", img.size, "white")
                canvas.paste(img, mask=img.getchannel("A"))
                img = canvas
            elif img.mode != "RGB":
                img = img.convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - shown as "unreadable" in the gallery
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def gallery(records: list[Record], media_dir: Path, n: int, seed: int) -> list[dict]:
    picked = random.Random(seed).sample(records, min(n, len(records)))
    picked.sort(key=lambda r: (r.dataset, r.index))
    out = []
    for rec in picked:
        images = []
        for rel in rec.images[:4]:
            facts = read_image_facts(media_dir, rel)
            uri = None if facts.error else thumbnail_data_uri(media_dir, rel)
            images.append({"path": rel, "width": facts.width, "height": facts.height, "data_uri": uri,
                           "error": facts.error or (None if uri else "cannot decode image")})
        out.append({"dataset": rec.dataset, "split": rec.split, "index": rec.index, "images": images,
                    "more_images": max(0, len(rec.images) - 4), "turns": [(role, text_of(c)) for role, c in rec.turns]})
    return out


# ----------------------------------------------------------------------------------------------- duplicates

DUPLICATE_CLUSTERS = 12  # clusters shown, largest first
DUPLICATE_COPIES = 6  # dropped copies shown per cluster


def duplicate_clusters(build: Build, limit: int = DUPLICATE_CLUSTERS, copies: int = DUPLICATE_COPIES) -> dict | None:
    """The duplicates a ``dedup`` build dropped, as clusters (the record kept and the rows that repeated it),
    largest first; None for builds without dedup. Two streaming passes over ``rejects.jsonl`` (count, then collect
    the shown clusters' rows); the kept records' images come from ``fingerprints.npz`` (row -> split, index) and one
    pass over their datasets."""
    dedup = (build.manifest.get("recipe") or {}).get("dedup")
    if not dedup:
        return None
    path = build.root / "rejects.jsonl"
    sizes: Counter = Counter()
    for row in _duplicate_rejects(path):
        sizes[row["duplicate_of"]] += 1
    shown = sorted(sizes, key=lambda p: (-sizes[p], p))[:limit]
    members: dict[int, list[dict]] = {p: [] for p in shown}
    for row in _duplicate_rejects(path):
        bucket = members.get(row["duplicate_of"])
        if bucket is not None and len(bucket) < copies:
            bucket.append({"position": row["position"], "id": row.get("id"), "images": row.get("images") or []})
    kept = _kept_records(build, shown)
    clusters = [{"kept": {"position": p, **kept.get(p, {})}, "copies": sizes[p], "shown": members[p]} for p in shown]
    return {"mode": dedup.get("mode"), "threshold": dedup.get("threshold") if dedup.get("mode") == "near" else None,
            "dropped": sum(sizes.values()), "clusters": len(sizes), "largest": max(sizes.values(), default=0) + 1,
            "leaks": build.counts.get("rejected_by_reason", {}).get("leak", 0), "shown": clusters}


def _duplicate_rejects(path: Path) -> Iterator[dict]:
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"reason": "duplicate"' not in line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("duplicate_of"), int):
                yield row


def _kept_records(build: Build, positions: list[int]) -> dict[int, dict]:
    """Split, index and images of the kept records at these input rows (from the build's fingerprints.npz)."""
    import numpy as np

    from ..layout import SPLITS

    npz = build.root / "fingerprints.npz"
    if not positions or not npz.is_file():
        return {}
    with np.load(npz, allow_pickle=False) as z:
        position, split, index = z["position"], z["split"], z["index"]
    order = np.argsort(position)
    at = np.searchsorted(position[order], positions)
    dataset_of = {d.get("split"): name for name, d in build.manifest.get("datasets", {}).items()}
    wanted: dict[tuple[str, int], int] = {}
    out: dict[int, dict] = {}
    for p, a in zip(positions, at.tolist(), strict=True):
        if a < len(order) and position[order[a]] == p:
            i = order[a]
            name = dataset_of.get(SPLITS[int(split[i])])
            out[p] = {"split": SPLITS[int(split[i])], "index": int(index[i]), "images": []}
            if name:
                wanted[(name, int(index[i]))] = p
    remaining = set(wanted)
    for name, i, raw in build.iter_records():
        if not remaining:
            break
        if (name, i) in remaining:
            remaining.discard((name, i))
            try:
                _, images, _ = lfdata.to_turns(raw, build.attrs[name]) if isinstance(raw, dict) else ([], [], [])
            except (ValueError, TypeError, IndexError):
                images = []
            out[wanted[(name, i)]]["images"] = [str(im) for im in images if isinstance(im, str)]
    return out


def duplicates_html(dups: dict, media_dir: Path) -> list[str]:
    what = {"exact": "the same conversation on the same image bytes", "image": "the same image bytes",
            "near": f"the same images up to near copies (pHash within {dups['threshold']} bits)",
            "text": "the same conversation text"}.get(dups["mode"], dups["mode"])
    out = [f"<h2>Duplicates {_badge(True)}</h2>",
           f"<p>dedup: <code>{_e(dups['mode'])}</code> ({_e(what)}) dropped <b>{dups['dropped']:,}</b> records in "
           f"{dups['clusters']:,} clusters (largest: {dups['largest']:,} records)"
           + (f"; {dups['leaks']:,} more repeated a <code>dedup.against</code> dataset" if dups["leaks"] else "")
           + ". Each row: the record kept, then the copies dropped (<code>rejects.jsonl</code>, reason "
             "<code>duplicate</code>).</p>"]
    if not dups["shown"]:
        out.append('<p class="muted">No duplicates found.</p>')
    for cluster in dups["shown"]:
        kept = cluster["kept"]
        where = f"kept: row {kept['position']:,}" + (f" ({_e(kept['split'])} #{kept['index']:,})" if "split" in kept
                                                      else "")
        cells = [_thumb(media_dir, kept.get("images") or [], where, kept=True)]
        cells += [_thumb(media_dir, m["images"], f"dropped: row {m['position']:,}"
                         + (f" id {_e(m['id'])}" if m.get("id") is not None else "")) for m in cluster["shown"]]
        more = cluster["copies"] - len(cluster["shown"])
        out.append(f'<div class="dups"><div class="where">{1 + cluster["copies"]:,} records'
                   + (f" ({more:,} more copies not shown)" if more > 0 else "") + "</div>"
                   + '<div class="dup-row">' + "".join(cells) + "</div></div>")
    return out


def _thumb(media_dir: Path, images: list[str], caption: str, kept: bool = False) -> str:
    uri = thumbnail_data_uri(media_dir, images[0], side=160) if images else None
    body = (f'<img src="{uri}" alt="{_e(images[0])}" title="{_e(images[0])}">' if uri
            else f'<div class="missing">{"no image" if not images else "unreadable: " + _e(images[0])}</div>')
    return f'<div class="dup{" kept" if kept else ""}">{body}<div class="muted">{caption}</div></div>'


# ----------------------------------------------------------------------------------------------- HTML

CSS = """
:root { --fg:#1d1d1f; --muted:#6b6b70; --line:#e3e3e8; --bg:#fafafa; --accent:#3559c7; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; background: var(--bg); color: var(--fg);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", "Source Han Sans SC",
  "WenQuanYi Micro Hei", "PingFang SC", "Microsoft YaHei", sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 32px 0 10px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; } h3 { font-size: 14px; margin: 18px 0 6px; }
.muted { color: var(--muted); } code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
table { border-collapse: collapse; background: #fff; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 8px; margin-left: 6px;
  vertical-align: 1px; }
.exact { background: #e2f3e5; color: #1e6b2f; } .sampled { background: #fdf0d8; color: #8a5a00; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 140px; }
.card .v { font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 12px; }
.plots img { width: 100%; background: #fff; border: 1px solid var(--line); border-radius: 6px; }
.rec { display: grid; grid-template-columns: 340px 1fr; gap: 16px; background: #fff; border: 1px solid var(--line);
  border-radius: 8px; padding: 12px; margin-bottom: 12px; }
.rec .imgs img { max-width: 320px; max-height: 320px; display: block; margin-bottom: 6px; border: 1px solid var(--line);
  background: repeating-conic-gradient(#eee 0% 25%, #fff 0% 50%) 50% / 16px 16px; }
.rec .missing { color: #b00020; font-size: 12px; }
.msg { margin: 0 0 8px; } .role { font-size: 11px; font-weight: 600; text-transform: uppercase; color: var(--accent); }
.msg.assistant .role { color: #1e6b2f; } .msg.system .role { color: var(--muted); }
.content { white-space: pre-wrap; word-break: break-word; margin: 2px 0 0; font-size: 13.5px; }
.where { font-size: 12px; color: var(--muted); margin-bottom: 6px; }
.reco { background: #fff; border-left: 4px solid var(--accent); padding: 8px 14px; margin: 8px 0; }
.dups { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; margin-bottom: 10px; }
.dup-row { display: flex; gap: 10px; flex-wrap: wrap; } .dup { width: 168px; font-size: 11px; }
.dup img { max-width: 160px; max-height: 160px; display: block; border: 2px solid var(--line); }
.dup.kept img { border-color: #1e6b2f; }
"""


MEASURE_LABELS = {
    "prompt_chars": "prompt length (characters; system + user turns)", "answer_chars": "answer length (characters)",
    "prompt_tokens": "prompt length (text tokens)", "answer_tokens": "answer length (text tokens)",
    "turns": "turns per record (assistant replies)", "messages": "messages per record (without system)",
    "images_per_record": "images per record",
    "total_tokens": "sequence length (text + image + template tokens)", "width": "image width (px)",
    "height": "image height (px)", "file_kb": "image file size (KiB)", "image_tokens": "Qwen2-VL tokens per image",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _n(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}" if isinstance(value, (int, float)) else _e(value)


def _badge(exact: bool, sample_size: int = 0, total: int = 0) -> str:
    if exact:
        return '<span class="badge exact">exact</span>'
    if total and sample_size >= total:
        return f'<span class="badge exact">all {total:,} records</span>'
    return f'<span class="badge sampled">sample of {sample_size:,}</span>'


def _count_cell(key: str, value: int) -> str:
    return f'<td class="num" data-count="{_e(key)}">{value:,}</td>'


def render_html(stats: dict, plots: list[tuple[str, str]], items: list[dict], rejects: dict[str, list[dict]],
                duplicates: list[str] | None = None) -> str:
    c = stats["counts"]
    n = stats["sample"]["size"]
    name = stats["build"]["name"]
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">', f"<title>mmdata report: {_e(name)}</title>", f"<style>{CSS}</style>",
        "</head><body>",
        f"<h1>Dataset report: {_e(name)}</h1>",
        f'<div class="muted">build folder <code>{_e(stats["build"]["dir"])}</code> · mmdata {_e(__version__)}</div>',
        f'<p class="muted">Numbers marked {_badge(True)} come from the build manifest. '
        + (f"Distributions and recommendations {_badge(False, n, c['written'])} cover every written record. "
           if n >= c["written"] else
           f"Numbers marked {_badge(False, n)} come from a seeded random sample of {n:,} of the "
           f"{c['written']:,} written records (seed {stats['sample']['seed']}); record counts projected from it "
           "are rounded. ")
        + f"Text tokens are {_e(stats['tokens']['text'])}.</p>",
        "<h2>Counts " + _badge(True) + "</h2>", '<div class="cards">',
    ]
    for key in ("read", "written", "rejected"):
        out.append(f'<div class="card"><div class="muted">{key}</div>'
                   f'<div class="v" data-count="{key}">{c[key]:,}</div></div>')
    out.append("</div>")
    if c.get("by_split"):
        out.append('<h3>Per split</h3><table><tr><th>split</th><th class="num">records</th><th>dataset</th></tr>')
        datasets = {d.get("split"): ds for ds, d in stats["build"]["datasets"].items()}
        for split, value in c["by_split"].items():
            out.append(f"<tr><td>{_e(split)}</td>{_count_cell('by_split:' + split, value)}"
                       f"<td><code>{_e(datasets.get(split, ''))}</code></td></tr>")
        out.append("</table>")
    if c.get("by_source"):
        out.append('<h3>Per source</h3><table><tr><th>source</th><th class="num">records written</th></tr>')
        for source, value in c["by_source"].items():
            out.append(f"<tr><td>{_e(source)}</td>{_count_cell('by_source:' + source, value)}</tr>")
        out.append("</table>")
    if c.get("rejected_by_reason"):
        out.append('<h3>Rejected, by reason</h3><table><tr><th>reason</th><th class="num">records</th>'
                   "<th>examples from <code>rejects.jsonl</code></th></tr>")
        for reason, value in c["rejected_by_reason"].items():
            examples = "".join(
                f'<div><code>#{_e(r.get("position"))}</code>'
                + (f' id <code>{_e(r["id"])}</code>' if r.get("id") is not None else "")
                + (f' source <code>{_e(r["source"])}</code>' if r.get("source") else "")
                + f' <span class="muted">{_e(_clip(str(r.get("message", "")), 300))}</span></div>'
                for r in rejects.get(reason, []))
            out.append(f"<tr><td>{_e(reason)}</td>{_count_cell('rejected_by_reason:' + reason, value)}"
                       f"<td>{examples}</td></tr>")
        out.append("</table>")

    out.append(f"<h2>Recommendations {_badge(False, n, c['written'])}</h2>")
    reco = stats["recommendations"]
    if "cutoff_len" in reco:
        cl = reco["cutoff_len"]
        out.append(f'<div class="reco"><b>cutoff_len: {cl["value"]:,}</b> covers 99% of records '
                   f'(p99 {_n(cl["p99_tokens"])} tokens, longest {_n(cl["max_tokens"])}). '
                   + (f'About {over:,} records are longer than LLaMA-Factory\'s default 2048 and would be truncated '
                      "with it. " if (over := cl["records_over_default_2048"]) else
                      "LLaMA-Factory's default 2048 truncates none of them. ")
                   + f'<span class="muted">{_e(cl["note"])}.</span></div>')
    out.append('<h3>What <code>image_max_pixels</code> would downscale</h3><table><tr><th>image_max_pixels</th>'
               '<th class="num">images above it (sample)</th><th class="num">records downscaled (projected)</th>'
               '<th class="num">image tokens p50</th><th class="num">image tokens p99</th></tr>')
    for row in reco["image_max_pixels"]:
        mark = " (used in this report)" if row["image_max_pixels"] == stats["image_max_pixels"] else ""
        out.append(f'<tr><td>{row["image_max_pixels"]:,} = {_e(row["side"])}{mark}</td>'
                   f'<td class="num">{row["images_downscaled_in_sample"]:,} of {row["images_in_sample"]:,}</td>'
                   f'<td class="num">{row["records_downscaled"]:,}</td>'
                   f'<td class="num">{_n(row["image_tokens_p50"] or 0)}</td>'
                   f'<td class="num">{_n(row["image_tokens_p99"] or 0)}</td></tr>')
    out.append("</table>")
    if stats["image_errors"]:
        out.append('<p class="missing">Images that could not be read in the sample: '
                   + ", ".join(f"{_e(k)}: {v:,}" for k, v in stats["image_errors"].items()) + "</p>")

    out.append(f"<h2>Distributions {_badge(False, n, c['written'])}</h2>")
    out.append('<table><tr><th>measure</th><th class="num">n</th><th class="num">mean</th><th class="num">min</th>'
               '<th class="num">p50</th><th class="num">p90</th><th class="num">p99</th><th class="num">max</th></tr>')
    for key, d in stats["distributions"].items():
        if d.get("count"):
            out.append(f"<tr><td>{_e(MEASURE_LABELS.get(key, key))}</td>" + "".join(f'<td class="num">{_n(d[k])}</td>' for k in
                       ("count", "mean", "min", "p50", "p90", "p99", "max")) + "</tr>")
    out.append("</table>")
    out.append('<div class="plots">' + "".join(f'<img src="plots/{_e(f)}" alt="{_e(t)}">' for f, t in plots)
               + "</div>")

    out += duplicates or []
    out.append(f'<h2>Gallery <span class="muted">({len(items)} records, seed {stats["sample"]["seed"]})</span></h2>')
    out.append('<div class="gallery">')
    for item in items:
        imgs = []
        for im in item["images"]:
            if im["data_uri"]:
                imgs.append(f'<img src="{im["data_uri"]}" alt="{_e(im["path"])}" title="{_e(im["path"])} '
                            f'({im["width"]}x{im["height"]})"><div class="muted" style="font-size:11px">'
                            f'{im["width"]}x{im["height"]}</div>')
            else:
                imgs.append(f'<div class="missing">{_e(im["error"])}: <code>{_e(im["path"])}</code></div>')
        if item["more_images"]:
            imgs.append(f'<div class="muted">+{item["more_images"]} more images</div>')
        if not item["images"]:
            imgs.append('<div class="muted">no image</div>')
        msgs = "".join(f'<div class="msg {_e(role)}"><div class="role">{_e(role)}</div>'
                       f'<div class="content">{_e(_clip(content, TEXT_LIMIT))}</div></div>'
                       for role, content in item["turns"])
        out.append(f'<div class="rec"><div class="imgs">{"".join(imgs)}</div><div>'
                   f'<div class="where">{_e(item["dataset"])} · split {_e(item["split"])} · record {item["index"]:,}'
                   f"</div>{msgs}</div></div>")
    out.append("</div>")
    out.append('<p class="muted">Machine-readable: <code>stats.json</code> next to this page.</p></body></html>')
    return "\n".join(out)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit:,} more characters)"
