"""Write tiny, randomly initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint folders that load offline like
the real ones.

Why: tests, CI and users without a GPU or network need a model folder that every consumer of a real
``Qwen/Qwen2-VL-2B-Instruct``, ``Qwen/Qwen2.5-VL-3B-Instruct`` or ``Qwen/Qwen3-VL-2B-Instruct`` download accepts
unchanged (``AutoProcessor``, ``AutoModelForImageTextToText`` and the family's own class, LLaMA-Factory's templates
and mm plugins), yet trains in seconds on a CPU. So each folder copies the real checkpoint's *layout and semantics*
and shrinks only the sizes:

- ``config.json`` is the hub's format: flat for Qwen2-VL and Qwen2.5-VL (text keys at the top level,
  ``vision_config``, ``rope_scaling: {type: mrope, mrope_section}``, the special token ids; Qwen2.5-VL's vision tower
  with window attention, ``fullatt_block_indexes`` and a SwiGLU MLP), nested for Qwen3-VL (``text_config`` with
  ``head_dim`` and interleaved M-RoPE, ``vision_config`` with patch 16, learned position embeddings and
  ``deepstack_visual_indexes``), which transformers 4.x and 5.x read;
- the tokenizer is a real byte-level BPE with Qwen2's pre-tokenizer regex, trained here (deterministically) on a
  small built-in corpus, followed by Qwen2's special tokens in Qwen2's order (``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, ..., ``<|vision_start|>``, ``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``,
  ``<|video_pad|>``) and, like the real Qwen2.5 / Qwen3 vocabularies, the non-special added tokens after them
  (``<tool_call>``, FIM tokens; Qwen3 also ``<tool_response>``, ``<think>``, ``</think>``), so ids differ from the
  real ones but every token plays the same role;
- ``preprocessor_config.json`` is the real one (Qwen2/2.5-VL: patch 14, CLIP mean/std, ``min_pixels`` /
  ``max_pixels``; Qwen3-VL: patch 16, mean/std 0.5, ``size: {shortest_edge, longest_edge}``, plus its
  ``video_preprocessor_config.json``), and the family's own chat template is saved in ``tokenizer_config.json`` and
  ``chat_template.json``.

Each folder is about 1 MB. It is a smoke model: its outputs are noise until trained.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from .families import FAMILIES, QWEN2_VL_CHAT_TEMPLATE  # noqa: F401 - QWEN2_VL_CHAT_TEMPLATE: re-exported

# Qwen2's special tokens in the order of the real vocabulary (real ids 151643..151656).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
# Added tokens after them that are not special (``"special": false`` in the real tokenizer.json): Qwen2.5's tool and
# FIM tokens (real ids 151657..151664), Qwen3's tool-response and thinking tokens (151665..151668).
_QWEN25_EXTRA = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>")
EXTRA_TOKENS = {
    "qwen2_vl": (),
    "qwen2_5_vl": _QWEN25_EXTRA,
    "qwen3_vl": _QWEN25_EXTRA + ("<tool_response>", "</tool_response>", "<think>", "</think>"),
}

# Qwen2's pre-tokenizer regex (tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# The real preprocessor_config.json of Qwen2-VL-*-Instruct (Qwen2.5-VL's differs only in processor_class).
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": _CLIP_MEAN,
    "image_std": _CLIP_STD,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
# The real preprocessor_config.json and video_preprocessor_config.json of Qwen3-VL-2B-Instruct.
QWEN3_VL_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
QWEN3_VL_VIDEO_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}
PREPROCESSOR_CONFIGS = {
    "qwen2_vl": PREPROCESSOR_CONFIG,
    "qwen2_5_vl": {**PREPROCESSOR_CONFIG, "processor_class": "Qwen2_5_VLProcessor"},
    "qwen3_vl": QWEN3_VL_PREPROCESSOR_CONFIG,
}
TINY_FAMILIES = tuple(PREPROCESSOR_CONFIGS)

_CORPUS = """You are a helpful assistant. Describe the image. What is in this picture? Transcribe the formula.
Write the LaTeX code of the formula in the image. The image shows a chest X-ray with no acute findings.
This is a computed tomography scan of the abdomen showing the liver, the kidneys and the spleen.
The answer is yes. The answer is no. A red square on a white background. A blue circle. Green text.
\\frac{a}{b} + \\frac{c}{d} = \\frac{ad + bc}{bd} E = mc^{2} \\sum_{i=1}^{n} i \\int_{0}^{1} x^{2} dx \\sqrt{x}
\\alpha \\beta \\gamma \\delta \\theta \\lambda \\mu \\pi \\sigma \\omega \\left( \\right) \\mathbf{E} \\cdot \\times
the of and to in is that for it as with was on be by this are from at or an which have not has but its
"""


def _train_tokenizer(vocab_size: int, pad_vocab_to: int | None = None, family: str = "qwen2_vl"):
    """A byte-level BPE shaped exactly like Qwen2's ``tokenizer.json``, trained on :data:`_CORPUS`, then the
    family's added tokens (:data:`SPECIAL_TOKENS`, then :data:`EXTRA_TOKENS` as non-special added tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    if pad_vocab_to:
        vocab = tok.get_vocab()
        vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), pad_vocab_to)})
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges(tok)]
        model = models.BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
        pre, norm, dec = tok.pre_tokenizer, tok.normalizer, tok.decoder
        tok = Tokenizer(model)
        tok.pre_tokenizer, tok.normalizer, tok.decoder = pre, norm, dec
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS[family]])
    return tok


def _merges(tok) -> list:
    return json.loads(tok.to_str())["model"]["merges"]


def _family(family: str) -> str:
    if family not in PREPROCESSOR_CONFIGS:
        raise ValueError(f"no tiny model for {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    return family


def _tokenizer_config(tok, family: str = "qwen2_vl") -> dict:
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": special}
             for tokens, special in ((SPECIAL_TOKENS, True), (EXTRA_TOKENS[family], False)) for t in tokens}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                                      "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                                      "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                      "<|video_pad|>"],
        "bos_token": None,
        "chat_template": FAMILIES[family].chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144 if family == "qwen3_vl" else 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",  # like the real Qwen2-VL tokenizer_config; the trainer pads explicitly anyway
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def tiny_config(vocab_size: int, ids: dict[str, int], *, hidden_size: int = 64, layers: int = 2,
                family: str = "qwen2_vl") -> dict:
    """Hub-style ``config.json`` of a tiny ``family`` model (head_dim 16, so ``mrope_section`` sums to 8).

    Qwen2-VL / Qwen2.5-VL: flat, as Qwen2-VL-2B-Instruct / Qwen2.5-VL-3B-Instruct; Qwen3-VL: nested, as
    Qwen3-VL-2B-Instruct (whose vision ``model_type`` is the old ``qwen3_vl``; transformers renames it on load).
    """
    tokens = {
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }
    if _family(family) == "qwen3_vl":
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            **tokens,
            "text_config": {
                "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"],
                "dtype": "float32", "eos_token_id": ids["<|im_end|>"], "head_dim": 16, "hidden_act": "silu",
                "hidden_size": hidden_size, "initializer_range": 0.02, "intermediate_size": hidden_size * 2,
                "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
                "num_attention_heads": hidden_size // 16, "num_hidden_layers": layers,
                "num_key_value_heads": max(1, hidden_size // 32), "rms_norm_eps": 1e-06,
                # the real [24, 20, 20] of head_dim 128, scaled: interleaved T/H/W frequencies, the tail temporal
                "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
                "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": vocab_size,
            },
            "tie_word_embeddings": True,
            "dtype": "float32",
            "vision_config": {
                # the real model adds DeepStack features of blocks 5, 11, 17 (of 24) to decoder layers 0-2
                "deepstack_visual_indexes": [0, 1], "depth": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 32,
                "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 64, "model_type": "qwen3_vl",
                "num_heads": 2, "num_position_embeddings": 256, "out_hidden_size": hidden_size, "patch_size": 16,
                "spatial_merge_size": 2, "temporal_patch_size": 2,
            },
        }
    config = {
        "architectures": [FAMILIES[family].model_class],
        "model_type": family,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        **tokens,
        "vision_token_id": ids["<|vision_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": hidden_size * 2,
        "max_position_embeddings": 32768,
        "max_window_layers": layers,
        "num_attention_heads": hidden_size // 16,
        "num_hidden_layers": layers,
        "num_key_value_heads": max(1, hidden_size // 32),
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3, "hidden_size": hidden_size,
            "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": vocab_size,
    }
    if family == "qwen2_5_vl":
        config["max_position_embeddings"] = 128000
        config["vision_config"] = {
            # the real one: 32 RMSNorm + SwiGLU blocks, windows of 112 pixels, full attention every 8th block
            "depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "in_chans": 3, "out_hidden_size": hidden_size, "patch_size": 14, "spatial_merge_size": 2,
            "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2,
            "temporal_patch_size": 2,
        }
    return config


def make_tiny_model(path: str | os.PathLike, family: str = "qwen2_vl", *, seed: int = 0, hidden_size: int = 64,
                    layers: int = 2, tokenizer_vocab: int = 600) -> Path:
    """Write a tiny ``family`` checkpoint (``qwen2_vl``, ``qwen2_5_vl`` or ``qwen3_vl``) to ``path`` (created; files
    inside are overwritten) and return the path.

    Loads offline with ``AutoProcessor.from_pretrained(path)`` and ``AutoModelForImageTextToText`` (or the family's
    class, e.g. ``Qwen3VLForConditionalGeneration``); ``mmdata train --model path`` accepts it.
    """
    import torch

    out = Path(path)
    ids, vocab = write_tokenizer_and_processor(out, tokenizer_vocab, family=family)
    config = tiny_config(-(-vocab // 64) * 64, ids, hidden_size=hidden_size, layers=layers, family=family)

    def rescale_embeddings(model):
        # With 64-dim hidden states of RMS 1 and the usual 0.02-std embeddings, no logit can exceed ~1.3, so the
        # (tied) vocabulary projection could never fit anything: give the embeddings a trained-like scale instead.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.1)

    write_random_model(out, config, seed=seed, dtype=torch.float32, adjust=rescale_embeddings)
    return out


def make_tiny_qwen2vl(path: str | os.PathLike, **kwargs) -> Path:
    """A tiny random Qwen2-VL (see :func:`make_tiny_model`)."""
    return make_tiny_model(path, "qwen2_vl", **kwargs)


def write_tokenizer_and_processor(out: Path, tokenizer_vocab: int = 600, pad_vocab_to: int | None = None, *,
                                  family: str = "qwen2_vl"):
    """Tokenizer, tokenizer/processor configs and chat template; returns (special token ids, vocabulary size).

    ``pad_vocab_to`` appends unreachable filler tokens before the special tokens, so that with 151643 the special
    tokens get the real Qwen2 ids (``<|image_pad|>`` = 151655 ...), for benchmarks with the exact real config.
    """
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(tokenizer_vocab, pad_vocab_to, _family(family))
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out), None)  # vocab.json + merges.txt, for code paths that rebuild the BPE from them
    _write_json(out / "tokenizer_config.json", _tokenizer_config(tok, family))
    _write_json(out / "special_tokens_map.json", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                   "additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIGS[family])
    if family == "qwen3_vl":
        _write_json(out / "video_preprocessor_config.json", QWEN3_VL_VIDEO_PREPROCESSOR_CONFIG)
    _write_json(out / "chat_template.json", {"chat_template": FAMILIES[family].chat_template})
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + EXTRA_TOKENS[family]}
    return ids, tok.get_vocab_size()


def write_random_model(out: Path, config: dict, *, seed: int = 0, dtype=None, device: str | None = None,
                       adjust=None) -> None:
    """Randomly initialise the model of a hub-style ``config`` (its ``model_type`` picks the class) and save it."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(seed)
    fields = copy.deepcopy(config)  # some versions edit the dict
    model_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device or "cpu"):
        model = AutoModelForImageTextToText.from_config(model_config)
    model = model.to(dtype or torch.float32)
    if adjust is not None:
        adjust(model)
    model.save_pretrained(out, safe_serialization=True)
    _write_json(out / "config.json", config)  # the hub's format, read by transformers 4.x and 5.x alike
    text = config.get("text_config", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": text["bos_token_id"], "pad_token_id": text["bos_token_id"],
        "eos_token_id": [text["eos_token_id"], text["bos_token_id"]], "do_sample": False,
    })


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
