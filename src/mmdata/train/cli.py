"""The ``train``, ``predict``, ``export`` and ``make-tiny-model`` subcommands, registered on mmdata's parser.

``add_train_commands(subparsers)`` only declares arguments; each handler imports torch/transformers when it runs,
so ``mmdata --help`` works on the core install (no torch). Handlers return an exit code; errors are
``MmdataError`` subclasses that the main CLI prints on one line.
"""

from __future__ import annotations

import argparse
import json

from ..cliargs import positive_int

# flags of `mmdata train` that map 1:1 onto TrainConfig fields (dashes -> underscores); None means "not given"
_TRAIN_FLAGS: dict[str, dict] = {
    "--max-steps": {"type": int}, "--learning-rate": {"type": float}, "--num-train-epochs": {"type": float},
    "--lora-r": {"type": int}, "--lora-alpha": {"type": int}, "--lora-dropout": {"type": float},
    "--target-modules": {"help": "comma-separated leaf names, e.g. q_proj,v_proj"},
    "--per-device-train-batch-size": {"type": int}, "--gradient-accumulation-steps": {"type": int},
    "--cutoff-len": {"type": int}, "--min-pixels": {"type": int}, "--max-pixels": {"type": int},
    "--max-samples": {"type": int}, "--save-steps": {"type": int}, "--eval-steps": {"type": int},
    "--logging-steps": {"type": int}, "--seed": {"type": int}, "--deepspeed": {},
    "--precision": {"choices": ["auto", "bf16", "fp16", "fp32"]},
    "--adapter-dtype": {"choices": ["auto", "bf16", "fp32"]},
    "--attn-implementation": {"choices": ["auto", "sdpa", "flash_attention_2", "flash_varlen_torch", "eager"]},
    "--batching": {"choices": ["auto", "pad", "pack"]}, "--report-to": {"choices": ["none", "tensorboard", "swanlab"]},
    "--quantization-bit": {"type": int, "choices": [4]}, "--dataloader-num-workers": {"type": int},
    "--compile": {"choices": ["auto", "true", "false"], "help": "torch.compile the decoder layers as --compile-scope says, and the frozen vision blocks (auto: CUDA with Triton, no QLoRA/DeepSpeed)"},
    "--compile-scope": {"choices": ["parts", "layers"], "help": "parts: attention/MLP/norms each; layers: each decoder layer whole"},
    "--lr-scheduler-type": {}, "--warmup-ratio": {"type": float}, "--weight-decay": {"type": float},
    "--max-grad-norm": {"type": float}, "--per-device-eval-batch-size": {"type": int},
    "--save-total-limit": {"type": int}, "--model-hub": {"choices": ["huggingface", "modelscope"]},
    "--train-datasets": {"help": "comma-separated entry names (default: the build's train split)"},
    "--val-datasets": {"help": "comma-separated entry names (default: the build's val split)"},
}


def add_train_commands(subparsers) -> None:
    """Register ``train``, ``predict``, ``export`` and ``make-tiny-model`` on an argparse subparsers object."""
    p = subparsers.add_parser("train", help="LoRA fine-tune Qwen2-VL / Qwen2.5-VL / Qwen3-VL on a build folder "
                                            "(needs mmdata[train])")
    p.add_argument("--model", help="model folder or hub id")
    p.add_argument("--dataset", help="mmdata build folder (or dataset_info.json)")
    p.add_argument("--output-dir")
    p.add_argument("--config", help="train.yaml with any TrainConfig option; flags override it")
    for flag, spec in _TRAIN_FLAGS.items():
        p.add_argument(flag, default=None, **spec)
    p.add_argument("--packing", action="store_true", default=None, help="same as --batching pack")
    p.add_argument("--use-dora", action="store_true", default=None)
    p.add_argument("--lora-vision", action="store_true", default=None)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None)
    p.add_argument("--lora-merger", action="store_true", default=None)
    p.add_argument("--no-compile-vision", dest="compile_vision", action="store_false", default=None,
                   help="with --compile on, leave the frozen vision tower eager")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="start over even if output-dir has checkpoints")
    p.add_argument("--resume-from", dest="resume", default=None, help="continue from this checkpoint folder")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("predict", help="generate on a split and score it (needs mmdata[train])")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", help="LoRA adapter folder (the train output-dir)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--datasets", help="comma-separated entry names instead of --split")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--max-samples", type=positive_int)
    p.add_argument("--min-pixels", type=positive_int)
    p.add_argument("--max-pixels", type=positive_int)
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("export", help="merge a LoRA adapter into the base model (needs mmdata[train])")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--output-dir", required=True)
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("make-tiny-model", help="write a tiny random Qwen-VL model for offline smoke tests")
    p.add_argument("path")
    p.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"],
                   help="which model's layout to copy (default qwen2_vl)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)


def _require_train_extra() -> None:
    import importlib.util

    from ..errors import MmdataError

    missing = [m for m in ("torch", "transformers", "peft", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MmdataError(f"this command needs {', '.join(missing)}: pip install 'mmdata[train]'")


def cmd_train(args: argparse.Namespace) -> int:
    _require_train_extra()
    from .config import load_train_config
    from .trainer import train

    fields = ["model", "dataset", "output_dir", "use_dora", "lora_vision", "lora_merger", "gradient_checkpointing",
              "resume", "packing", "compile_vision"]
    fields += [flag[2:].replace("-", "_") for flag in _TRAIN_FLAGS]
    config = load_train_config(args.config, **{f: getattr(args, f) for f in fields})
    record = train(config)
    print(json.dumps({"output_dir": config.output_dir, "global_step": record["global_step"],
                      "data": record["data"], "metrics": record["metrics"]}, default=str))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    _require_train_extra()
    from .predict import predict

    metrics = predict(args.model, args.dataset, args.output_dir, adapter=args.adapter, split=args.split,
                      datasets=args.datasets.split(",") if args.datasets else None, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, max_samples=args.max_samples,
                      min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    print(json.dumps(metrics, ensure_ascii=False))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _require_train_extra()
    from .export import export

    print(export(args.model, args.adapter, args.output_dir))
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    _require_train_extra()
    from .tiny import make_tiny_model

    print(make_tiny_model(args.path, args.family, seed=args.seed))
    return 0
