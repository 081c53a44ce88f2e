"""The report's plots: one PNG per distribution, drawn with matplotlib (Agg), the cutoff marked."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .stats import Measures

# ----------------------------------------------------------------------------------------------- plots

PLOTS = [  # file name, title, [(table, key, label)], x label
    ("text_chars.png", "Text length (characters)",
     [("records", "prompt_chars", "prompt"), ("records", "answer_chars", "answer")], "characters per record"),
    ("text_tokens.png", "Text length (tokens)",
     [("records", "prompt_tokens", "prompt"), ("records", "answer_tokens", "answer")], "tokens per record"),
    ("total_tokens.png", "Sequence length: text + image + template tokens",
     [("records", "total_tokens", "total")], "tokens per record"),
    ("image_size.png", "Image size (pixels)", [("images", "width", "width"), ("images", "height", "height")], "pixels"),
    ("file_size.png", "Image file size", [("images", "file_kb", "file size")], "KiB"),
    ("image_tokens.png", "Qwen2-VL image tokens", [("images", "image_tokens", "image tokens")], "tokens per image"),
    ("turns.png", "Turns per record (assistant replies)", [("records", "turns", "turns")], "turns"),
]


def write_plots(m: Measures, folder: Path, marker: float | None, max_pixels: int) -> list[tuple[str, str]]:
    """One small PNG per distribution (ASCII labels only: no CJK font needed); returns (file, title) pairs."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, series, xlabel in PLOTS:
        data = [(label, getattr(m, table).get(key, [])) for table, key, label in series]
        data = [(label, values) for label, values in data if values]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 2.8), dpi=90)
        lo = min(min(values) for _, values in data)
        hi = max(max(values) for _, values in data)
        for label, values in data:
            if name == "turns.png":
                c = Counter(int(v) for v in values)
                ax.bar(list(c), list(c.values()), width=0.6, label=label, color="#4c72b0")
                ax.set_xticks(sorted(c))
            else:  # shared bins, so overlaid series compare bar for bar
                ax.hist(values, bins=40 if hi > lo else 1, range=(lo, hi if hi > lo else lo + 1), alpha=0.6,
                        label=label)
        if name == "total_tokens.png" and marker:
            ax.axvline(marker, color="#c44e52", linestyle="--", linewidth=1.2, label=f"cutoff_len {int(marker)}")
        if name == "image_tokens.png":
            title = f"{title} at image_max_pixels={max_pixels:,}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("count", fontsize=9)
        ax.tick_params(labelsize=8)
        if len(data) > 1 or name == "total_tokens.png":
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append((name, title))
    return written
