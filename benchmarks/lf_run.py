"""Run the real LLaMA-Factory trainer on configs written by ``mmdata llamafactory``, timed like mmdata's own runs.

Runs inside LLaMA-Factory's environment (its pinned transformers 4.57 / peft 0.18), started by ``train_gpu.py
peers``. Each job is a YAML file plus the keys changed to match the benchmark setting; it goes through
``llamafactory.train.tuner.run_exp``, the function ``llamafactory-cli train`` calls, with one extra callback (the
step clock of ``measure.py``). The one intrusion: LLaMA-Factory's SFT trainer class is subclassed in place so every
micro-batch it trains on is counted (samples, real tokens, patches) and its data waits are timed.

    python lf_run.py --jobs jobs.json --out results.json   # jobs: [{"name", "yaml", "set", "warmup", "model"}]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import architecture_flops, step_clock, summarise  # noqa: E402


def run_job(job: dict) -> dict:
    import llamafactory
    import llamafactory.train.sft.workflow as workflow
    from llamafactory.train.tuner import run_exp

    args = yaml.safe_load(Path(job["yaml"]).read_text())
    args.update(job["set"])
    config = json.loads(Path(args["model_name_or_path"], "config.json").read_text())
    clock, instrument = step_clock(eos_id=job["eos_id"], pad_id=job["pad_id"])
    original = workflow.CustomSeq2SeqTrainer
    workflow.CustomSeq2SeqTrainer = instrument(original)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        run_exp(args=args, callbacks=[clock])
    finally:
        workflow.CustomSeq2SeqTrainer = original
    state = json.loads(Path(args["output_dir"], "trainer_state.json").read_text())
    result = summarise(f"llamafactory/{job['name']}", clock, job["warmup"], architecture_flops(config),
                       kind=job["kind"], family=job["family"], packing=job["packing"],
                       llamafactory=llamafactory.__version__,
                       transformers=__import__("transformers").__version__,
                       changed=job["set"])
    result["losses"] = [h["loss"] for h in state["log_history"] if "loss" in h]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = []
    for job in json.loads(Path(args.jobs).read_text()):
        try:
            results.append(run_job(job))
        except Exception as e:  # one failure must not lose the other figures
            traceback.print_exc()
            results.append({"run": f"llamafactory/{job['name']}", "error": repr(e)[:500]})
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("losses", "changed")}), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
