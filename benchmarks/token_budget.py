"""Cost of the token budget: records per second through ``TokenBudget.add`` for each model profile.

The build counts every written record (estimated text, template and image tokens), so the per-record cost must stay
small whatever the model. Seeded records: a system prompt in a quarter of them, one or two turns of 20-400
characters of mixed English/Chinese/LaTeX text, zero to two images of random sizes.

    python benchmarks/token_budget.py [--records 100000]

Run it at an older commit too (``PYTHONPATH=<old checkout>/src``): an mmdata without profiles times the only model
it knows, Qwen2-VL.
"""

from __future__ import annotations

import argparse
import inspect
import random
import time

from mmdata import tokens

WORDS = ["the", "lesion", "is", "in", "left", "lower", "lobe", "肺", "结节", "\\frac{a}{b}", "x^2", "CT", "MRI", "of"]


def make_records(n: int, seed: int = 0) -> list[tuple[list[tuple[str, str]], list[tuple[int, int]]]]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        images = [(rng.randint(16, 4000), rng.randint(16, 4000)) for _ in range(rng.choice([0, 1, 1, 1, 2]))]
        turns = [("system", "You are a radiologist.")] if rng.random() < 0.25 else []
        for t in range(rng.choice([1, 1, 2])):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 80)))
            turns += [("user", "<image>" * (len(images) if t == 0 else 0) + text), ("assistant", text[::-1])]
        records.append((turns, images))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    records = make_records(args.records)
    with_models = "model" in inspect.signature(tokens.token_counter).parameters
    models = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_nothink", "gemma3", "internvl"] if with_models else [None]
    for model in models:
        counter = tokens.token_counter(None, model=model) if with_models else tokens.token_counter(None)
        best = float("inf")
        for _ in range(3):
            budget = tokens.TokenBudget(2048, counter)
            started = time.perf_counter()
            for turns, images in records:
                budget.add(turns, images)
            best = min(best, time.perf_counter() - started)
        print(f"| {model or 'qwen2_vl (no profiles)'} | {args.records} | {best:.2f} s | {args.records / best:,.0f} "
              f"records/s | max {budget.max_tokens}, mean {budget.summary()['mean']} |")


if __name__ == "__main__":
    main()
