"""Host-side cost of one checkpointed LoRA training step per compile scope, on a CPU (no GPU needed).

A LaTeX-length step on the GPU is bound by the Python that launches its kernels, not by the kernels. This measures
that Python on a tiny model with the real layer count (28 decoder layers, hidden size 64, LoRA on the seven
projections with dropout, gradient checkpointing as the trainer enables it): the Python function calls per step
(``cProfile``; the same on any machine) and the wall time per step (tiny tensors, so mostly overhead; one CPU
thread). ``eager``: no compile; ``parts``: each layer's attention, MLP and norms compiled apart; ``layers``: each
layer with its checkpoint compiled whole, keeping the dropout masks (``model.keep_dropout_context``).

    python benchmarks/compile_overhead.py            # all three scopes, one process each
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import subprocess
import sys
import tempfile
import time


def measure(scope: str, steps: int = 10) -> dict:
    import torch

    from mmdata.train.config import load_train_config
    from mmdata.train.model import attach_lora, compile_language_layers, enable_checkpointing, load_model
    from mmdata.train.tiny import make_tiny_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = make_tiny_model(tempfile.mkdtemp(), layers=28)
    config = load_train_config(None, model=str(path), dataset="d", lora_dropout=0.05, lora_r=8)
    model = attach_lora(load_model(str(path), dtype=torch.float32), config)
    enable_checkpointing(model, keep_dropout=scope == "layers")
    model.train()
    if scope != "eager":
        compile_language_layers(model, scope)
    ids = torch.randint(0, 500, (2, 32))

    def step():
        model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean().backward()

    for _ in range(3):  # compile and warm up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    wall_ms = (time.perf_counter() - start) / steps * 1000
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    calls = pstats.Stats(profiler).total_calls
    return {"scope": scope, "python_calls_per_step": calls // steps, "wall_ms_per_step": round(wall_ms, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scope", choices=["eager", "parts", "layers"], help="one scope (default: all, apart)")
    args = parser.parse_args()
    if args.scope:
        print(measure(args.scope), flush=True)
        return
    for scope in ("eager", "parts", "layers"):  # one process each: compiled graphs and caches do not carry over
        subprocess.run([sys.executable, __file__, "--scope", scope], check=True)


if __name__ == "__main__":
    main()
