"""Print what the run produced: the logged loss per step, the metrics, the first prediction, the exported files.

Usage: ``python show_results.py OUT`` (the folder given to run.sh). Exits non-zero when no finite training loss was
logged. (``mmdata export`` itself reloads the exported processor and renders its chat template before it returns.)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def main(out: Path) -> int:
    state = json.loads((out / "run" / "trainer_state.json").read_text(encoding="utf-8"))
    losses = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
    print("loss by step: " + ", ".join(f"{step}: {loss:.3f}" for step, loss in losses))
    if not losses or not all(math.isfinite(loss) for _, loss in losses):
        print("error: no finite training loss in run/trainer_state.json", file=sys.stderr)
        return 1

    metrics = json.loads((out / "predict" / "metrics.json").read_text(encoding="utf-8"))
    print("metrics: " + ", ".join(f"{k} {metrics[k]}" for k in ("count", "exact_match", "cer", "bleu", "rouge_l")))
    first = json.loads((out / "predict" / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()[0])
    print(f"first prediction: label {first['label']!r}, predict {first['predict'][:40]!r}")

    merged = out / "merged"
    print(f"exported {merged}: {', '.join(sorted(p.name for p in merged.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/latex_ocr_train_predict")))
