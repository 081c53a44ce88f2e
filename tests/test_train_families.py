"""The trainer on each supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): tiny random models written offline in the
real checkpoints' layout, builds made with ``mmdata.build``, CPU only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("torchvision")
pytest.importorskip("sacrebleu")

from PIL import Image  # noqa: E402

from mmdata.train.config import TrainError, load_train_config  # noqa: E402
from mmdata.train.data import (  # noqa: E402
    VisionSFTCollator,
    build_dataset,
    read_conversations,
    resolve_split,
    to_messages,
)
from mmdata.train.families import FAMILIES, family_of  # noqa: E402
from mmdata.train.tiny import make_tiny_model  # noqa: E402

FAMILY_NAMES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration"}
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}
PIXELS = {"min_pixels": 3136, "max_pixels": 20000}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny_model(root / family, family) for family in FAMILY_NAMES}


@pytest.fixture(scope="session")
def processors(tiny_models):
    from transformers import AutoProcessor

    return {family: AutoProcessor.from_pretrained(path) for family, path in tiny_models.items()}


def _build(root: Path, recipe: dict) -> Path:
    import mmdata

    (root / "r.yaml").write_text(json.dumps({**recipe, "output": {"dir": str(root / "out")}}))
    return mmdata.build(str(root / "r.yaml"), num_proc=1).output_dir


@pytest.fixture(scope="session")
def latex_build(tmp_path_factory) -> Path:
    """Six rendered formulas: four train rows, two val rows."""
    formulas = ["x^{2}", "\\frac{a}{b}", "a + b = c", "\\alpha \\beta", "E = mc^{2}", "\\sqrt{x}"]
    return _build(tmp_path_factory.mktemp("latex"), {
        "name": "toy", "source": {"type": "synthetic_latex", "formulas": formulas},
        "prompt": "Write the LaTeX code of the formula in the image.", "split": {"val": 2}})


@pytest.fixture(scope="session")
def mixed_build(tmp_path_factory) -> Path:
    """A one-image sample and a two-image, two-turn one (a JSONL source), for the data path and the loss."""
    root = tmp_path_factory.mktemp("mixed")
    Image.new("RGB", (130, 60), (220, 30, 30)).save(root / "red.png")
    Image.new("RGB", (60, 90), (30, 200, 30)).save(root / "green.png")
    rows = [{"messages": [{"role": "user", "content": "<image>Write the formula."},
                          {"role": "assistant", "content": "\\frac{a}{b} = c"}], "images": ["red.png"]},
            {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"},
                          {"role": "user", "content": "And <image> this one?"},
                          {"role": "assistant", "content": "green \\alpha"}], "images": ["red.png", "green.png"]}]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _build(root, {"name": "mixed", "source": {"type": "jsonl", "path": "rows.jsonl"}})


def _dataset(processor, build: Path, split: str = "train"):
    info, names = resolve_split(build, split)
    return build_dataset(processor, read_conversations(info, names), cutoff_len=4096, **PIXELS)


def _load(path, family):
    import transformers

    return getattr(transformers, CLASSES[family]).from_pretrained(path)


# ---------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_is_shaped_like_the_real_checkpoint(tiny_models, processors, family):
    from transformers import AutoModelForImageTextToText

    path, processor = tiny_models[family], processors[family]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [CLASSES[family]]
    tok = processor.tokenizer
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert config[key] == tok.convert_tokens_to_ids(token)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (PATCH[family], 2, 2)
    text = processor.apply_chat_template(to_messages([("user", "<image>hi")]), tokenize=False,
                                         add_generation_prompt=True)
    system = "" if family == "qwen3_vl" else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert text == (system + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    if family == "qwen3_vl":
        assert config["text_config"]["rope_scaling"]["mrope_interleaved"] is True
        assert config["vision_config"]["deepstack_visual_indexes"]
        assert (path / "video_preprocessor_config.json").exists()
        assert ip.size == {"shortest_edge": 65536, "longest_edge": 16777216}
        think = tok.convert_tokens_to_ids("<think>")
        assert tok.decode([think]) == "<think>" and "<think>" not in tok.all_special_tokens
        assert tok("<think>\n\n</think>", add_special_tokens=False).input_ids[0] == think
    else:
        assert config["rope_scaling"]["type"] == "mrope"
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == CLASSES[family]
    assert sum(p.stat().st_size for p in path.iterdir()) < 5_000_000


# ---------------------------------------------------------------------------------------------- data path


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_image_tokens_and_pixels_match_the_processor(mixed_build, processors, family):
    """Per sample: as many <|image_pad|> as image_grid_thw.prod() / merge**2, and the processor's own ids, grids
    and pixels for the rendered conversation (patch 14 or 16, each family's image processor); labels are the
    replies and their <|im_end|> under each family's template."""
    processor = processors[family]
    dataset, stats = _dataset(processor, mixed_build)
    assert stats.kept == 2 and [len(s.images) for s in dataset.samples] == [1, 2]
    labels = dataset[1]["labels"]
    assert processor.tokenizer.decode(labels[labels != -100]) == "red<|im_end|>green \\alpha<|im_end|>"
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size
    info, names = resolve_split(mixed_build, "train")
    for index, (turns, _) in enumerate(read_conversations(info, names)):
        item, sample = dataset[index], dataset.samples[index]
        grids = item["image_grid_thw"]
        assert len(grids) == len(sample.images) and int((item["input_ids"] == image_id).sum()) == int(
            grids.prod(dim=1).sum()) // merge**2
        text = processor.apply_chat_template(to_messages(turns), tokenize=False)
        images = [Image.open(p).convert("RGB").resize((w, h), Image.BICUBIC)
                  for p, (h, w) in zip(sample.images, sample.sizes, strict=True)]
        ref = processor(text=[text], images=images, return_tensors="pt")  # the processor's own bounds
        assert torch.equal(ref["input_ids"][0], item["input_ids"])
        assert torch.equal(ref["image_grid_thw"], grids)
        assert torch.allclose(ref["pixel_values"], item["pixel_values"])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_mrope_positions_match_each_models_get_rope_index(mixed_build, tiny_models, processors, family):
    """The CPU positions equal the model's own ``get_rope_index`` (Qwen2.5-VL's time scaling and Qwen3-VL's
    per-frame video split do not touch images)."""
    processor = processors[family]
    dataset, _ = _dataset(processor, mixed_build)
    model = _load(tiny_models[family], family)
    for item in (dataset[0], dataset[1]):
        ids = item["input_ids"][None]
        mm_types = (ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm_types,
                                                  image_grid_thw=item["image_grid_thw"],
                                                  attention_mask=torch.ones_like(ids))
        assert torch.equal(positions[:, 0], item["position_ids"])


@pytest.mark.parametrize("attention", ["sdpa", "flash_varlen_torch"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_padded_and_packed_batches_give_the_models_loss_and_gradient(mixed_build, tiny_models, processors, family,
                                                                     attention):
    """The chunked loss over padded and over packed rows equals the model's own loss on the padded batch (SDPA with
    its 4-D masks), and so do the gradients: packing is exact for every family (Qwen3-VL's DeepStack features land on
    the same tokens), with SDPA and with mmdata's variable-length attention (``attention.py``: here its CPU path,
    SDPA under the records' block-diagonal mask, which the GPU kernel replaces; a packed row's boundaries come
    from the collator; the vision tower attends all images in one call)."""
    from mmdata.train.loss import NO_POSITIONS, final_norm, projected_cross_entropy_sum, tap_final_hidden_states
    from mmdata.train.model import pick_attention, use_attention

    processor = processors[family]
    dataset, _ = _dataset(processor, mixed_build)
    model = _load(tiny_models[family], family)
    layers = model.get_decoder().layers
    probes = [layers[0].mlp.down_proj.weight, layers[-1].self_attn.q_proj.weight]

    def loss_and_grads(pack: bool | None):
        model.zero_grad()
        batch = VisionSFTCollator(processor.tokenizer.pad_token_id, pack=bool(pack))([dataset[0], dataset[1]])
        labels, positions, targets = batch.pop("labels"), batch.pop("label_positions"), batch.pop("target_labels")
        if pack is None:  # the reference: the model's own loss over the full logits of the padded batch
            loss = model(**batch, labels=labels, use_cache=False).loss
        else:
            with tap_final_hidden_states(final_norm(model)) as hidden:
                model(**batch, logits_to_keep=NO_POSITIONS, use_cache=False)
            weight = model.get_output_embeddings().weight
            loss = projected_cross_entropy_sum(hidden[-1][positions], weight, targets, chunk=7) / targets.numel()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in probes]

    expected_loss, expected_grads = loss_and_grads(None)
    use_attention(model, pick_attention(attention))
    assert model.model.visual.config._attn_implementation == attention
    for pack in (False, True):
        loss, grads = loss_and_grads(pack)
        assert loss == pytest.approx(expected_loss, rel=1e-5), pack
        for grad, expected in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- module lookup


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_targets_and_hooks_find_each_familys_modules(tiny_models, processors, mixed_build, family):
    """Default targets: the seven projections of every decoder layer and nothing in the vision tower (Qwen2.5-VL's
    vision MLP is also called gate/up/down_proj); lora_vision / lora_merger add the family's vision linears; the
    frozen tower runs without autograd under gradient checkpointing; the loss hook sits on the decoder's norm."""
    from mmdata.train.loss import final_norm
    from mmdata.train.model import attach_lora, lora_target_names, run_frozen_vision_without_grad

    model = _load(tiny_models[family], family)
    layers = len(model.get_decoder().layers)
    config = load_train_config(None, model="m", dataset="d")
    language = lora_target_names(model, config)
    assert len(language) == 7 * layers and all(n.startswith("model.language_model.layers.") for n in language)
    vision = set(lora_target_names(model, load_train_config(None, model="m", dataset="d", lora_vision=True)))
    vision -= set(language)
    assert vision and all(n.startswith("model.visual.blocks.") for n in vision)
    assert {n.rsplit(".", 1)[-1] for n in vision} == set(FAMILIES[family].vision_block_linears)
    merger = set(lora_target_names(model, load_train_config(None, model="m", dataset="d", lora_merger=True)))
    merger -= set(language)
    assert {n.split(".")[2] for n in merger} == set(FAMILIES[family].mergers)
    assert final_norm(model) is model.get_decoder().norm

    peft_model = attach_lora(model, config)
    assert run_frozen_vision_without_grad(peft_model)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    dataset, _ = _dataset(processors[family], mixed_build)
    batch = VisionSFTCollator(processors[family].tokenizer.pad_token_id)([dataset[0], dataset[1]])
    seen = []
    handle = model.model.visual.register_forward_hook(lambda _m, _i, out: seen.append(out))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw")}
    peft_model(**inputs, use_cache=False).logits.float().mean().backward()
    handle.remove()
    features = list(_tensors(seen[0]))  # merged features; Qwen3-VL: also the DeepStack features
    deepstack = len(getattr(model.config.vision_config, "deepstack_visual_indexes", ()))
    assert len(features) >= 1 + deepstack
    assert not any(f.requires_grad for f in features)
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_frozen_vision_blocks_compile_whole_and_equal_the_eager_tower(tiny_models, processors, mixed_build, family):
    """``compile_vision_blocks`` under flash_varlen_torch: every block of each family's tower compiles without a
    graph break (the tower computes its attention boundaries outside the blocks), a micro-batch of other image
    sizes reuses the shape-generic graphs, and the features (Qwen3-VL: DeepStack ones too) equal the eager tower's."""
    from torch._dynamo.utils import counters

    from mmdata.train.model import attach_lora, compile_vision_blocks, load_model, run_frozen_vision_without_grad

    config = load_train_config(None, model="m", dataset="d")
    model = attach_lora(load_model(str(tiny_models[family]), dtype=torch.float32, attn="flash_varlen_torch"), config)
    assert run_frozen_vision_without_grad(model)
    visual = model.get_base_model().model.visual
    dataset, _ = _dataset(processors[family], mixed_build)
    batches = [VisionSFTCollator(processors[family].tokenizer.pad_token_id)(rows)
               for rows in ([dataset[0], dataset[1]], [dataset[1]])]
    run = lambda b: list(_tensors(visual(b["pixel_values"], grid_thw=b["image_grid_thw"])))  # noqa: E731
    eager = [run(b) for b in batches]
    compile_vision_blocks(model)
    counters.clear()
    compiled = [run(b) for b in batches]
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] <= 3 * len(visual.blocks)  # not one more graph per micro-batch
    for want, got in zip(eager, compiled, strict=True):
        assert len(want) == len(got)
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):  # model outputs are ordered dicts
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def test_unsupported_families_and_missing_modules_are_clear_errors(tmp_path, latex_build):
    from mmdata.train.model import language_model, vision_tower
    from mmdata.train.trainer import train

    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe"}))
    with pytest.raises(TrainError, match="qwen3_vl_moe.*fused 3-D parameters"):
        train(load_train_config(None, model=str(moe), dataset=str(latex_build), output_dir=str(tmp_path / "o")))
    with pytest.raises(TrainError, match="'llava' is not supported.*qwen2_vl.*qwen2_5_vl.*qwen3_vl"):
        family_of("llava")

    class NoTower(torch.nn.Module):
        config = type("Config", (), {"model_type": "qwen3_vl"})()

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2, 2)

        def get_decoder(self):
            return self.head

    with pytest.raises(TrainError, match="cannot find its language model"):
        language_model(NoTower())
    with pytest.raises(TrainError, match="expected one vision tower named 'visual', found 0"):
        vision_tower(NoTower())


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_train_predict_export(family, tiny_models, processors, latex_build, tmp_path):
    """A few LoRA steps (the loss falls), predict with base + adapter, export: the merged folder holds processor,
    tokenizer and the family's own chat template, reloads with the Auto classes, and generates what base + adapter
    generated (greedy, same tokens)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmdata.train.export import export
    from mmdata.train.predict import build_prompts, generate, load_for_inference, predict
    from mmdata.train.trainer import train

    base, out = tiny_models[family], tmp_path / "run"
    config = load_train_config(None, model=str(base), dataset=str(latex_build), output_dir=str(out), max_steps=8,
                               learning_rate=1e-2, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                               per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1,
                               save_steps=100, gradient_checkpointing=False, compile=False, **PIXELS)
    record = train(config)
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert record["global_step"] == 8 and record["data"]["train"] == {"kept": 4, "dropped": {}}
    assert record["model_type"] == family
    assert losses[-1] < 0.75 * losses[0], losses

    metrics = predict(str(base), str(latex_build), str(tmp_path / "pred"), adapter=str(out), max_new_tokens=8,
                      batch_size=2)
    rows = [json.loads(line) for line in (tmp_path / "pred" / "generated_predictions.jsonl").read_text().splitlines()]
    assert metrics["count"] == 2 == len(rows) and rows[0]["prompt"].endswith("<|im_start|>assistant\n")

    merged = export(str(base), str(out), str(tmp_path / "merged"))
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    exported = AutoProcessor.from_pretrained(merged)
    assert type(exported) is type(processors[family]) and exported.chat_template == processors[family].chat_template
    assert exported.image_processor.patch_size == PATCH[family]
    conversation = to_messages([("user", "<image>Write the formula.")])
    assert exported.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == \
        processors[family].apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert type(AutoModelForImageTextToText.from_pretrained(merged)).__name__ == CLASSES[family]

    # the adapter with another family's model: refused (export merged it with exit code 0; predict crashed)
    other = tiny_models[next(f for f in FAMILY_NAMES if f != family)]
    with pytest.raises(TrainError, match=f"is a {family} adapter, and --model .* is "):
        export(str(other), str(out), str(tmp_path / "crossed"))
    with pytest.raises(TrainError, match=f"is a {family} adapter"):
        predict(str(other), str(latex_build), str(tmp_path / "pred_crossed"), adapter=str(out), max_new_tokens=8)
    assert not (tmp_path / "crossed").exists()

    info, names = resolve_split(latex_build, "val")
    net, proc = load_for_inference(str(merged))
    items = build_prompts(read_conversations(info, names), proc)
    assert list(generate(net, proc, items, batch_size=2, max_new_tokens=8, **PIXELS)) == [r["predict"] for r in rows]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_images_are_trained_at_llamafactorys_size(tmp_path, processors, family):
    """Training and predict size an image as LLaMA-Factory does (its plugin's scaling into the pixel budget, then
    the processor's smart_resize), so Qwen2.5-VL's absolute box coordinates, written for that size, fit the image
    trained on; an image past 200:1 is squeezed to 180:1 as there, not dropped. The sizes equal the model profiles'
    (the rules `mmdata validate` and the build count with, checked against LLaMA-Factory in test_profiles)."""
    from mmdata.profiles import get_profile
    from mmdata.train.data import SampleEncoder

    encoder = SampleEncoder(processors[family], min_pixels=3136, max_pixels=589824, cutoff_len=4096)
    profile = get_profile(family).with_lf_args(image_max_pixels=589824, image_min_pixels=3136)
    image = profile.image
    for width, height in [(1920, 1080), (1080, 1920), (512, 512), (5000, 20), (20, 5000), (33, 29)]:
        path = tmp_path / f"{width}x{height}.png"
        Image.new("RGB", (width, height), (200, 30, 30)).save(path)
        h, w = encoder.target_size(str(path))
        assert (w, h) == image.input_size(width, height, profile.lf), (width, height)
    assert encoder.target_size(str(tmp_path / "1920x1080.png"))[::-1] == ((1036, 588) if family != "qwen3_vl"
                                                                          else (1024, 576))


def test_a_remote_code_model_folder_is_named_unsupported_not_an_old_transformers(tmp_path):
    """InternVL's folder (model_type internvl_chat, remote code): transformers' "upgrade transformers" message was
    the error; the trainer reads config.json itself and names the families it trains."""
    from mmdata.train.model import read_family

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "auto_map": {}}))
    with pytest.raises(TrainError, match="'internvl_chat' is not supported; the trainer handles qwen2_vl"):
        read_family(str(tmp_path))
