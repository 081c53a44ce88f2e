"""Duplicates, near-duplicate images and groups: the fingerprints workers compute, and what finalize decides from them.

Workers (``task.py``) compute fingerprints only when a recipe asks for ``dedup`` or ``split.group_by``, so a default
build costs and writes exactly what it did before. Per written record:

- ``image``: the content hash of each image, the first 8 bytes of ``sha256(bytes)``. Copy and convert already
  compute that hash to name the stored file, so it is free there; ``images: link`` names files by their path and is
  made to read and hash the bytes only when fingerprints are on;
- ``text``: 8 bytes of a hash of the normalised conversation (:func:`normalize_text`: NFKC, ``<image>``/``<video>``
  placeholders removed, casefolded, whitespace collapsed; role and text of every turn);
- ``phash`` (``dedup: near`` and ``split.group_by: near`` only): perceptual hashes of each image from one DCT
  (:func:`perceptual_hash`): the 64-bit pHash that indexes near copies, and a 256-bit one that confirms them;
- ``group`` (``split.group_by: <field>``): 8 bytes of a hash of the raw row's field value.

A task stages them in ``.mmdata/fingerprints/part-XXXXX.npz`` before its completion marker, like its records, so
resume and ``mmdata merge`` treat them as they treat the records. Finalize loads them all into flat numpy arrays
(8 bytes per record per key, plus 8 per image: about 200 MB per key at 25M rows) and decides in input order, so the
result is the same for any number of workers:

- exact keys (``exact``/``image``/``text``): ``np.unique(..., return_index=True)``, the first occurrence wins;
- near copies: multi-index hashing (:func:`near_pairs`, sub-quadratic) over the distinct 64-bit pHashes finds every
  pair within ``threshold`` bits (popcount of the xor); a pair counts when its 256-bit hashes also differ in at most
  ``FINE_PER_BIT * threshold`` bits (distinct images whose coarse hashes agree by chance are told apart there: at
  30k photo-like images, 2,381 chance pairs within 10 coarse bits, 5 left after the check, of 3,144 true copies
  0.03% lost); then connected components (:func:`components`); the earliest image is a cluster's representative.

64-bit keys collide by chance with probability about ``n**2 / 2**65`` (1.7e-5 at 25M distinct texts): a collision
would drop one record as a duplicate it is not. That is the price of 8 bytes per key; say so if it matters to you.

Why over 400 lines: the fingerprints, the near-duplicate index and the grouping are one job (decide, from the
fingerprints, which records are duplicates and which must share a split); each part is a pure function over numpy
arrays with its own docstring and test.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import unicodedata
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import combinations
from pathlib import Path

import numpy as np

from .recipes import NEAR_THRESHOLD  # default dedup.threshold; measured in docs/quality.md

#: Reasons of the records dedup drops on purpose: counted as rejects, never failing ``--strict``/``max_rejected``.
DEDUP_REASONS = ("duplicate", "leak")

_U64 = np.uint64


# ----------------------------------------------------------------------------------------------- keys of one record


_PLACEHOLDERS = re.compile(r"<image>|<video>")


def normalize_text(text: str) -> str:
    """The text a duplicate is judged by: NFKC, without ``<image>``/``<video>``, casefolded, whitespace collapsed.
    (ASCII text is its own NFKC form, and ``str.split`` collapses whitespace: ~10 us for a 450-character caption.)"""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    if "<" in text:
        text = _PLACEHOLDERS.sub(" ", text)
    return " ".join(text.casefold().split())


def text_key(turns: Iterable[tuple[str, object]]) -> int:
    """64-bit key of a conversation: role and normalised text of every turn, in order."""
    parts = []
    for role, content in turns:
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, sort_keys=True)
        parts.append(f"{role}\x1f{normalize_text(text)}")
    payload = "\x1e".join(parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "big")


def image_key_of_digest(hexdigest: str) -> int:
    """The image key from the hex ``sha256`` of its bytes (what names copied/converted files)."""
    return int(hexdigest[:16], 16)


def image_key_of_bytes(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def image_key_of_file(path: str | os.PathLike) -> int:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return int.from_bytes(digest.digest()[:8], "big")


def value_key(value: object) -> int | None:
    """64-bit key of a raw field value (``split.group_by: <field>``); None when the row has no value: missing, null,
    NaN, or a blank string (a CSV cell cannot say null any other way, and blank cells must not form one group)."""
    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip()):
        return None
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


_SIDE = 32  # pHash input: 32 x 32 grayscale
_DCT = np.cos(np.pi * (2 * np.arange(_SIDE)[None, :] + 1) * np.arange(_SIDE)[:, None] / (2 * _SIDE))


#: A near pair's 256-bit hashes may differ in at most this many bits per bit of ``threshold`` (50 of 256 at 10).
FINE_PER_BIT = 5

#: An 8-bit image whose 32 x 32 thumbnail has at most this many pixels (of 1,024) more than 16 gray levels away from
#: its median has too little content for a DCT hash: its AC coefficients are rounding noise (a flat swatch) or one
#: small blob (a short word on a blank page), so distinct images of the kind hash alike. It is matched by its pixels
#: instead (:func:`perceptual_hash`). Measured: flat colours 0, one 8-character word on a 512 x 512 page 7-9, a line
#: of 30 characters 25-33, the benchmark's 400 photo-like images 16 and more, LaTeX_OCR formulas 25 and more.
LOW_DETAIL_PIXELS = 12


def phash(image: bytes | str | os.PathLike) -> int:
    """The 64-bit DCT perceptual hash of an encoded image (bytes or a file); see :func:`perceptual_hash`."""
    return perceptual_hash(image)[0]


def perceptual_hash(image: bytes | str | os.PathLike) -> tuple[int, int, int, int, int]:
    """The 64-bit pHash of an encoded image (bytes or a file) and a 256-bit one from the same DCT, as 5 uint64.

    The documented pHash: grayscale, 32 x 32 (Lanczos after an integer box reduction), 2-D DCT-II as a matrix
    product, the top-left 8 x 8 coefficients, one bit per coefficient above the median of the 63 AC ones (so every
    hash has 32 ones and distances are even). The 256-bit hash is the same over the top-left 16 x 16 block: finer
    detail, which tells apart distinct images whose coarse layout agrees. A JPEG is decoded in draft mode at the
    smallest DCT scale that keeps 128 x 128 pixels: ~1 ms for a 512 x 512 photo, 3-4x faster than
    ``imagehash.phash`` (which decodes everything and needs scipy) and within 0.3 bits of it (docs/quality.md).
    16-bit and float images are hashed from their values, not from a clipped 8-bit view; transparent ones over
    white.

    An 8-bit image with almost no content (:data:`LOW_DETAIL_PIXELS`) gets, instead, five words
    of a hash of its pixels (:func:`_pixel_hash`): copies with the same pixels match it, and any other image is as
    far from it as a random hash is (~32 bits), so blank pages, flat swatches and short words on white are never
    taken for each other's near copies (they were: a pHash of noise). Their re-encoded or resized copies are then
    missed, the safe side: a record is kept, never dropped for a look-alike.
    """
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
        if img.format == "JPEG":
            img.draft("L", (4 * _SIDE, 4 * _SIDE))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, "white")
            canvas.alpha_composite(rgba)
            gray = canvas.convert("L")
        elif img.mode in ("I", "F") or img.mode.startswith("I;16"):
            gray = img.convert("F")
        else:
            gray = img.convert("L")
        small = gray.resize((_SIDE, _SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)  # box-reduce first
    pixels = np.asarray(small, dtype=np.float64)
    if small.mode == "L" and np.count_nonzero(np.abs(pixels - np.median(pixels)) > 16) <= LOW_DETAIL_PIXELS:
        return _pixel_hash(image)
    dct = _DCT @ pixels @ _DCT.T
    coarse, fine = dct[:8, :8].ravel(), dct[:16, :16].ravel()
    words = np.packbits(np.concatenate([coarse > np.median(coarse[1:]), fine > np.median(fine[1:])])).view(">u8")
    return tuple(int(w) for w in words)


def _pixel_hash(image: bytes | str | os.PathLike) -> tuple[int, int, int, int, int]:
    """Five words of a hash of the full-size colour pixels at 16 levels per channel: what a low-detail image is
    matched by (:data:`LOW_DETAIL_PIXELS`). Colour, because grayscale makes red and green one swatch; full size, because
    a short word on a page is below a thumbnail's resolution."""
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8) // 16
    digest = hashlib.blake2b(b"mmdata-low-detail" + np.array(rgb.shape, dtype="<u4").tobytes() + rgb.tobytes(),
                             digest_size=40).digest()
    return tuple(int(w) for w in np.frombuffer(digest, dtype=">u8"))


# ----------------------------------------------------------------------------------------------- staged per task


def fingerprints_needed(recipe) -> bool:
    """Workers compute fingerprints only for recipes that use them: the default build stays as fast as before."""
    return recipe.dedup is not None or recipe.split.group_by is not None


def task_fingerprints_path(layout, task: int) -> Path:
    return layout.state / "fingerprints" / f"part-{task:05d}.npz"


@dataclass
class RecordPrint:
    """The fingerprints of one record, computed by the worker before its images are stored."""

    text: int
    images: list[int]
    phashes: list[tuple[int, ...]] | None = None  # per image: the 5 words of :func:`perceptual_hash`
    group: int | None = None


@dataclass
class TaskFingerprints:
    """Collects one task's record fingerprints in staged order; :meth:`save` writes them before the task's marker."""

    position: list[int] = field(default_factory=list)
    text: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    image: list[int] = field(default_factory=list)
    phash: list[tuple[int, ...]] = field(default_factory=list)
    group: list[int] = field(default_factory=list)
    has_group: list[bool] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    answer_tokens: list[int] = field(default_factory=list)
    ids: list[object] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def add(self, position: int, fp: RecordPrint, tokens: int, answer_tokens: int, record_id: object,
            source: str | None) -> None:
        self.position.append(position)
        self.text.append(fp.text)
        self.counts.append(len(fp.images))
        self.image += fp.images
        self.phash += fp.phashes or []
        self.group.append(fp.group or 0)
        self.has_group.append(fp.group is not None)
        self.tokens.append(tokens)
        self.answer_tokens.append(answer_tokens)
        self.ids.append(record_id)
        self.sources.append(source or "")

    def save(self, path: Path, near: bool, grouped: bool) -> None:
        arrays = {
            "position": np.array(self.position, dtype=np.int64),
            "text": np.array(self.text, dtype=_U64),
            "offsets": np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64),
            "image": np.array(self.image, dtype=_U64),
            "tokens": np.array(self.tokens, dtype=np.int64),
            "answer_tokens": np.array(self.answer_tokens, dtype=np.int64),
        }
        if near:
            arrays["phash"] = np.array(self.phash, dtype=_U64).reshape(-1, 5)
        if grouped:
            arrays["group"] = np.array(self.group, dtype=_U64)
            arrays["has_group"] = np.array(self.has_group, dtype=bool)
        if any(i is not None for i in self.ids):
            arrays["ids"] = np.array([json.dumps(i, ensure_ascii=False).encode("utf-8", "surrogatepass")
                                      for i in self.ids], dtype=bytes)
        if any(self.sources):
            names = sorted(set(self.sources))
            arrays["source_names"] = np.array(names, dtype=str)
            arrays["source"] = np.array([names.index(s) for s in self.sources], dtype=np.int32)
        save_arrays(path, arrays)


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` (read by ``np.load``) whose bytes depend only on the arrays: stored, not compressed, with fixed
    timestamps (``np.savez`` stamps the current time), replaced whole (:func:`mmdata.atomic.replaced_on_close`)."""
    from .atomic import replaced_on_close

    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_on_close(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


# ----------------------------------------------------------------------------------------------- loaded


@dataclass
class Fingerprints:
    """Flat arrays over records (in input order) and their images; image ``k`` of record ``r`` is
    ``image[offsets[r] + k]``."""

    position: np.ndarray  # int64 [R]: the input row of each record (or the record's index in a dataset)
    text: np.ndarray  # uint64 [R]
    offsets: np.ndarray  # int64 [R + 1]
    image: np.ndarray  # uint64 [I]
    phash: np.ndarray | None = None  # uint64 [I, 5]: the coarse 64-bit pHash, then the 256-bit one
    group: np.ndarray | None = None  # uint64 [R]
    has_group: np.ndarray | None = None  # bool [R]
    tokens: np.ndarray | None = None  # int64 [R]
    answer_tokens: np.ndarray | None = None  # int64 [R]
    source: np.ndarray | None = None  # int32 [R], into source_names
    source_names: list[str] = field(default_factory=list)
    task_starts: np.ndarray | None = None  # int64: first record of each task (staged fingerprints only)

    def __len__(self) -> int:
        return len(self.position)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def record_of_image(self) -> np.ndarray:
        return np.repeat(np.arange(len(self), dtype=np.int64), self.counts)

    def image_index(self, index: np.ndarray) -> np.ndarray:
        """The image occurrences of the records at ``index``, in order."""
        index = np.asarray(index, dtype=np.int64)
        counts = self.counts[index]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return np.repeat(self.offsets[:-1][index] - starts[:-1], counts) + np.arange(starts[-1], dtype=np.int64)

    def take(self, index: np.ndarray) -> Fingerprints:
        """The records at ``index`` (ascending), with their images."""
        index = np.asarray(index, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(self.counts[index])]).astype(np.int64)
        images = self.image_index(index)
        per_record = {f.name: getattr(self, f.name)[index] for f in fields(self)
                      if f.name in ("position", "text", "group", "has_group", "tokens", "answer_tokens", "source")
                      and getattr(self, f.name) is not None}
        return replace(self, **per_record, offsets=offsets, image=self.image[images],
                       phash=None if self.phash is None else self.phash[images], task_starts=None)

    @classmethod
    def concat(cls, parts: Sequence[Fingerprints]) -> Fingerprints:
        """Records of ``parts`` one after the other (an optional array is kept only when every part has it)."""
        def joined(name: str, dtype) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            if any(a is None for a in arrays):
                return None
            return np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0, 5) if name == "phash" else 0, dtype)

        counts = np.concatenate([p.counts for p in parts]) if parts else np.zeros(0, np.int64)
        names = sorted({n for p in parts for n in p.source_names})
        source = None
        if names:
            source = np.concatenate([np.array([names.index(s) for s in p.source_names], dtype=np.int32)[p.source]
                                     if p.source is not None else np.full(len(p), -1) for p in parts]).astype(np.int32)
        return cls(joined("position", np.int64), joined("text", _U64),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), joined("image", _U64),
                   joined("phash", _U64), joined("group", _U64), joined("has_group", bool), joined("tokens", np.int64),
                   joined("answer_tokens", np.int64), source, names,
                   np.cumsum([0, *(len(p) for p in parts[:-1])]).astype(np.int64) if parts else None)


def load_task_fingerprints(layout, num_tasks: int) -> Fingerprints:
    """Every task's staged fingerprints, concatenated in input order."""
    from .errors import BuildError

    parts = []
    for task in range(num_tasks):
        path = task_fingerprints_path(layout, task)
        try:
            with np.load(path, allow_pickle=False) as z:
                parts.append(Fingerprints(
                    z["position"], z["text"], z["offsets"], z["image"], z["phash"] if "phash" in z else None,
                    z["group"] if "group" in z else None, z["has_group"] if "has_group" in z else None,
                    z["tokens"], z["answer_tokens"], z["source"] if "source" in z else None,
                    [str(s) for s in z["source_names"]] if "source_names" in z else []))
        except FileNotFoundError:
            raise BuildError(f"{path}: the fingerprints of task {task} are missing (a build of an older mmdata?); "
                             "rerun with --rebuild") from None
    return Fingerprints.concat(parts)


class TaskRecordIds:
    """The record ids of one task's staged records (None where the row had none), for reject lines; decoded one
    at a time, only for the records dedup drops."""

    def __init__(self, layout, task: int):
        with np.load(task_fingerprints_path(layout, task), allow_pickle=False) as z:
            self._ids = z["ids"] if "ids" in z else None

    def __getitem__(self, index: int) -> object:
        return None if self._ids is None else json.loads(self._ids[index].decode("utf-8", "surrogatepass"))


# ----------------------------------------------------------------------------------------------- near pairs


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[np.ascontiguousarray(x).view(np.uint8).reshape(-1, 8)].sum(axis=1)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each value: a fixed, seedable scramble (numpy's random streams may change between versions)."""
    x = np.asarray(x, dtype=_U64)
    with np.errstate(over="ignore"):
        x = x + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _plan(n: int, threshold: int) -> tuple[list[int], int]:
    """Chunk sizes (bits, summing to 64) and the radius to search within each chunk.

    Pigeonhole: if two hashes are within ``threshold`` bits, one of ``m`` chunks differs in at most
    ``threshold // m`` bits. For a radius ``r``, masking every ``r``-subset of a chunk's bits groups all pairs
    within ``r`` there: ``comb(bits, r)`` sorts per chunk. Few chunks mean many sorts, many chunks mean short keys
    and many chance candidates (about ``n**2 / 2**(bits - r + 1)`` per sort for random hashes). The plan minimises
    sorts x n + candidates, so it moves to longer chunks as ``n`` grows (the sub-quadratic part of multi-index
    hashing)."""
    best = None
    for m in range(1, min(threshold + 1, 32) + 1):
        r = threshold // m
        sizes = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        if r > min(sizes):
            continue
        sorts = sum(math.comb(s, r) for s in sizes)
        # measured, in units of one candidate check (~20 ns): a sort of <= 16-bit keys (radix) with its gathers
        # costs ~2 per hash (4 for wider keys), plus ~15,000 of fixed overhead
        sort_cost = n * (2 if max(sizes) - r <= 16 else 4) + 15_000
        candidates = sum(math.comb(s, r) * n * n / 2 ** (s - r + 1) for s in sizes)
        cost = sorts * sort_cost + candidates
        if best is None or cost < best[0]:
            best = (cost, sizes, r)
    return best[1], best[2]


def near_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, of distinct positions whose hashes differ in at most ``threshold`` bits
    (multi-index hashing, see :func:`_plan`). Equal hashes pair too; pass distinct values to save work. Given
    :func:`perceptual_hash` rows (``[n, 5]``), the pairs are found on the 64-bit column and kept only where the
    256-bit hashes differ in at most ``FINE_PER_BIT * threshold`` bits."""
    hashes = np.asarray(hashes, dtype=_U64)
    fine = None
    if hashes.ndim == 2:
        hashes, fine = np.ascontiguousarray(hashes[:, 0]), hashes[:, 1:]
    n = len(hashes)
    found: list[np.ndarray] = []
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sizes, radius = _plan(n, threshold) if threshold > 0 else ([64], 0)
    shift = 0
    for bits in sizes:
        chunk = (hashes >> _U64(shift)) & _U64((1 << bits) - 1)
        shift += bits
        for masked in combinations(range(bits), radius):
            keep = (1 << bits) - 1 - sum(1 << b for b in masked)
            keys = chunk & _U64(keep)
            if bits - radius <= 16:
                keys = keys.astype(np.uint16) if bits <= 16 else _compact(keys, keep).astype(np.uint16)
            found.extend(_candidates_within(keys, hashes, threshold))
            if len(found) > 64:  # a close pair turns up in many sorts: keep each once, so memory stays O(pairs)
                found = [np.unique(np.concatenate(found))]
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes = np.unique(np.concatenate(found))
    a, b = codes // n, codes % n
    if fine is not None:
        close = popcount(fine[a] ^ fine[b]).sum(axis=1) <= FINE_PER_BIT * threshold
        a, b = a[close], b[close]
    return a, b


def _compact(keys: np.ndarray, mask: int) -> np.ndarray:
    """The bits of ``keys`` under ``mask``, packed together (so a 17-bit chunk minus one bit fits 16 bits)."""
    out = np.zeros(len(keys), dtype=_U64)
    k = 0
    for b in range(64):
        if mask >> b & 1:
            out |= ((keys >> _U64(b)) & _U64(1)) << _U64(k)
            k += 1
    return out


def _candidates_within(keys: np.ndarray, hashes: np.ndarray, threshold: int) -> Iterable[np.ndarray]:
    """Pairs with equal ``keys`` (runs of the sorted keys) whose full hashes are within ``threshold``, as codes
    ``i * n + j`` with ``i < j``; verified one run offset at a time, in sorted order, so memory stays O(n)."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    ordered, sorted_hashes = keys[order], hashes[order]
    starts = np.flatnonzero(ordered[1:] == ordered[:-1])
    step = 1
    while starts.size:
        close = starts[popcount(sorted_hashes[starts] ^ sorted_hashes[starts + step]) <= threshold]
        if close.size:
            a, b = order[close], order[close + step]
            yield np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b)
        step += 1
        starts = starts[starts + step < n]
        starts = starts[ordered[starts + step] == ordered[starts]]


def components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes joined by edges ``src[k] - dst[k]``: each node's root is the smallest
    node of its component (union-find by hooking roots under the smaller one, then full path compression; numpy
    throughout)."""
    parent = np.arange(n, dtype=np.int64)
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    while src.size:
        a, b = parent[src], parent[dst]
        apart = a != b
        if not apart.any():
            break
        src, dst, a, b = src[apart], dst[apart], a[apart], b[apart]
        np.minimum.at(parent, np.maximum(a, b), np.minimum(a, b))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


# ----------------------------------------------------------------------------------------------- decisions


def image_labels(image: np.ndarray, phashes: np.ndarray | None = None, threshold: int = NEAR_THRESHOLD) -> np.ndarray:
    """For each image occurrence, the occurrence index of the earliest image of its cluster: identical bytes, and
    with ``phashes`` also near copies (within ``threshold`` bits, joined transitively)."""
    if not len(image):
        return np.zeros(0, np.int64)
    _, first, inverse = np.unique(image, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # distinct images by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    node = rank[inverse]
    if phashes is not None and threshold >= 0:
        values, value_of = _distinct_rows(phashes[first[order]])
        a, b = near_pairs(values, threshold)
        u = len(order)  # nodes: distinct images (by first appearance), then distinct pHash values
        src = np.concatenate([np.arange(u), u + a])
        dst = np.concatenate([u + value_of, u + b])
        node = components(u + len(values), src, dst)[node]  # an image node is always its component's smallest
    return first[order][node]


def _distinct_rows(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct hashes (rows of perceptual hashes, or plain values) and, for each input, its distinct index."""
    if hashes.ndim == 1:
        return np.unique(hashes, return_inverse=True)
    key = mix64(hashes[:, 0])
    for column in range(1, hashes.shape[1]):
        key = mix64(key ^ hashes[:, column])
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return hashes[first], inverse


def record_keys(offsets: np.ndarray, labels: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    """One 64-bit key per record from the labels of its images, in order (and ``base``, e.g. its text key)."""
    counts = np.diff(offsets)
    key = mix64(counts.astype(_U64))
    if base is not None:
        key = mix64(key ^ mix64(base))
    if not len(labels):
        return key
    for j in range(int(counts.max()) if len(counts) else 0):
        has = counts > j
        label = labels[offsets[:-1][has] + j].astype(_U64)
        key[has] = mix64(key[has] ^ mix64(label + _U64(j + 1)))
    return key


def first_occurrence(keys: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
    """For each record, the earliest record with the same key (itself when it is the first); -1 if not eligible."""
    out = np.full(len(keys), -1, dtype=np.int64)
    idx = np.arange(len(keys), dtype=np.int64) if eligible is None else np.flatnonzero(eligible)
    if idx.size:
        _, first, inverse = np.unique(keys[idx], return_index=True, return_inverse=True)
        out[idx] = idx[first][inverse]
    return out


@dataclass
class Duplicates:
    """What dedup decided for a build's records (indices into its fingerprints)."""

    duplicate_of: np.ndarray  # int64 [R]: -1, or the earlier kept record this one repeats
    leak_of: np.ndarray  # int64 [R]: -1, or the record of the ``against`` datasets this one repeats
    labels: np.ndarray | None  # image cluster labels of this build's image occurrences (image/near/exact modes)

    @property
    def dropped(self) -> np.ndarray:
        return (self.duplicate_of >= 0) | (self.leak_of >= 0)


def find_duplicates(fp: Fingerprints, mode: str, threshold: int = NEAR_THRESHOLD,
                    against: Fingerprints | None = None) -> Duplicates:
    """Duplicates in input order (the first occurrence is kept). ``mode``: ``exact`` (same normalised text and the
    same image bytes, in order), ``image`` (the same image bytes, whatever the text), ``near`` (the same images up
    to near copies), ``text`` (the same normalised text, whatever the images). Records without images are never
    duplicates under ``image``/``near``. ``against`` records count as coming first: a record that repeats one of
    them is a leak."""
    ext = 0 if against is None else len(against)
    both = fp if against is None else Fingerprints.concat([against, fp])
    labels = None
    if mode == "text":
        keys, eligible = both.text, None
    else:
        if mode == "near" and both.phash is None:
            raise ValueError("dedup: near needs the pHash of every image")
        labels = image_labels(both.image, both.phash if mode == "near" else None, threshold)
        keys = record_keys(both.offsets, labels, both.text if mode == "exact" else None)
        eligible = None if mode == "exact" else both.counts > 0
    first = first_occurrence(keys, eligible)[ext:]
    own = np.arange(len(fp), dtype=np.int64) + ext
    duplicate_of = np.where((first >= ext) & (first != own), first - ext, -1)
    leak_of = np.where((first >= 0) & (first < ext), first, -1)
    if labels is not None:
        labels = labels[int(both.offsets[ext]):]
    return Duplicates(duplicate_of, leak_of, labels)


def groups_by_image(offsets: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each record's group: its earliest record sharing an image cluster with it, directly or through others
    (a record with several images joins all their groups); records without images stand alone."""
    n = len(offsets) - 1
    if not len(labels):
        return np.arange(n, dtype=np.int64)
    values, label_node = np.unique(labels, return_inverse=True)
    record = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    return components(n + len(values), record, n + label_node)[:n]


def groups_by_value(keys: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Each record's group: its earliest record with the same field value; records without one stand alone."""
    out = np.arange(len(keys), dtype=np.int64)
    first = first_occurrence(keys, present)
    out[present] = first[present]
    return out


def assign_groups(groups: np.ndarray, positions: np.ndarray, k_val: int, k_test: int, seed: int) -> np.ndarray:
    """Split codes (0 train, 1 val, 2 test) that keep each group whole.

    Groups are visited in a seeded order (a splitmix64 hash of the seed and the input position of each group's
    first record: independent of the worker count and of numpy's random streams). A group goes to val if it fits
    what val still needs, else to test if it fits there, else to train; so val/test reach their sizes exactly when
    small groups are plentiful, and otherwise come as close as the groups allow from below."""
    roots, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    priority = mix64(positions[roots].astype(_U64) ^ mix64(np.array([seed % 2**64], dtype=_U64)))
    order = np.argsort(priority, kind="stable")
    code = np.zeros(len(roots), dtype=np.uint8)
    need = [k_val, k_test]
    smallest = int(sizes.min()) if len(sizes) else 0
    for g, size in zip(order.tolist(), sizes[order].tolist(), strict=True):
        if max(need) < smallest:
            break
        for split in (0, 1):
            if size <= need[split]:
                code[g] = split + 1
                need[split] -= size
                break
    return code[inverse]


# ----------------------------------------------------------------------------------------------- leakage


def leak_matches(query: Fingerprints, reference: Fingerprints, threshold: int | None) -> dict[str, np.ndarray]:
    """For each query record, a reference record it leaks into (-1: none), by kind: ``exact_image`` (an image with
    the same bytes), ``near_image`` (an image within ``threshold`` bits, exact copies included; only when both
    have pHashes and ``threshold`` is not None) and ``text`` (the same normalised conversation)."""
    out = {"exact_image": _match_records(query, reference, query.image, reference.image)}
    if threshold is not None and query.phash is not None and reference.phash is not None:
        out["near_image"] = _near_match_records(query, reference, threshold)
    order = np.argsort(reference.text, kind="stable")
    at = np.searchsorted(reference.text[order], query.text)
    hit = at < len(order)
    hit[hit] = reference.text[order][at[hit]] == query.text[hit]
    text = np.full(len(query), -1, dtype=np.int64)
    text[hit] = order[at[hit]]
    out["text"] = text
    return out


def _first_per_record(query: Fingerprints, image_match: np.ndarray, reference: Fingerprints) -> np.ndarray:
    """Per query record: the reference record of its first matched image (-1: none)."""
    out = np.full(len(query), -1, dtype=np.int64)
    hit = np.flatnonzero(image_match >= 0)[::-1]  # reversed: the record's first matched image is assigned last
    ref_record = np.searchsorted(reference.offsets, image_match[hit], side="right") - 1
    out[query.record_of_image()[hit]] = ref_record
    return out


def _match_records(query: Fingerprints, reference: Fingerprints, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    order = np.argsort(r, kind="stable")
    at = np.searchsorted(r[order], q)
    match = np.full(len(q), -1, dtype=np.int64)
    hit = at < len(order)
    hit[hit] = r[order][at[hit]] == q[hit]
    match[hit] = order[at[hit]]
    return _first_per_record(query, match, reference)


def _near_match_records(query: Fingerprints, reference: Fingerprints, threshold: int) -> np.ndarray:
    values, inverse = _distinct_rows(np.concatenate([reference.phash, query.phash]))
    ref_value, q_value = inverse[:len(reference.phash)], inverse[len(reference.phash):]
    holder = np.full(len(values), -1, dtype=np.int64)  # a reference image with this pHash value
    holder[ref_value[::-1]] = np.arange(len(ref_value), dtype=np.int64)[::-1]
    near = holder.copy()
    a, b = near_pairs(values, threshold)
    for x, y in ((a, b), (b, a)):  # a value within the threshold of a reference value
        take = (near[y] < 0) & (holder[x] >= 0)
        near[y[take]] = holder[x[take]]
    return _first_per_record(query, near[q_value], reference)
