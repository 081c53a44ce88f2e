"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL LoRA fine-tuning on mmdata builds: train, predict with metrics, merge/export,
tiny offline models.

Needs the ``train`` extra (torch, transformers, peft, accelerate, sacrebleu, torchvision). Importing this package
is cheap: the functions below import torch when called.
"""

from __future__ import annotations


def train(config):
    """Train a LoRA adapter from a :class:`mmdata.train.config.TrainConfig` (see ``trainer.train``)."""
    from .trainer import train as _train

    return _train(config)


def predict(*args, **kwargs):
    """Generate on a split and write ``generated_predictions.jsonl`` + ``metrics.json`` (see ``predict.predict``)."""
    from .predict import predict as _predict

    return _predict(*args, **kwargs)


def export(*args, **kwargs):
    """Merge an adapter into its base and save model + processor + chat template (see ``export.export``)."""
    from .export import export as _export

    return _export(*args, **kwargs)


def make_tiny_model(path, family="qwen2_vl", **kwargs):
    """Write a tiny random ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl`` checkpoint (see ``tiny.make_tiny_model``)."""
    from .tiny import make_tiny_model as _make

    return _make(path, family, **kwargs)


def make_tiny_qwen2vl(path, **kwargs):
    """Write a tiny random Qwen2-VL checkpoint folder (see ``tiny.make_tiny_qwen2vl``)."""
    from .tiny import make_tiny_qwen2vl as _make

    return _make(path, **kwargs)


__all__ = ["train", "predict", "export", "make_tiny_model", "make_tiny_qwen2vl"]
