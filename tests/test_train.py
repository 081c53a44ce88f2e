"""The trainer end to end on CPU, with a tiny random Qwen2-VL and a small build folder written in tmp_path."""

from __future__ import annotations

import copy
import inspect
import json
import shutil
import subprocess
import sys
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
    smart_resize,
    to_messages,
)
from mmdata.train.metrics import compute_metrics, edit_distance, rouge_l  # noqa: E402
from mmdata.train.tiny import make_tiny_qwen2vl  # noqa: E402

SHAREGPT = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "system_tag": "system"}}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny") / "qwen2vl")


@pytest.fixture(scope="session")
def processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


def write_build(root: Path, train: list[dict], val: list[dict]) -> Path:
    """A build folder shaped like `mmdata build` output: dataset_info.json, split shards, manifest, images."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (130, 60), (220, 30, 30)).save(root / "images" / "red.png")
    Image.new("RGB", (60, 90), (30, 200, 30)).save(root / "images" / "green.png")
    info = {}
    for name, records in (("toy_train", train), ("toy_val", val)):
        (root / name).mkdir(exist_ok=True)
        (root / name / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        info[name] = {"file_name": name, **SHAREGPT}
    (root / "dataset_info.json").write_text(json.dumps(info))
    (root / "mmdata_build.json").write_text(json.dumps({"datasets": {
        "toy_train": {"split": "train", "count": len(train)}, "toy_val": {"split": "val", "count": len(val)}}}))
    return root


ONE_TURN = {"messages": [{"role": "user", "content": "<image>Write the formula."},
                         {"role": "assistant", "content": "\\frac{a}{b} = c"}], "images": ["images/red.png"]}
MULTI = {"messages": [{"role": "user", "content": "<image>What colour?"},
                      {"role": "assistant", "content": "red"},
                      {"role": "user", "content": "And <image> this one?"},
                      {"role": "assistant", "content": "green \\alpha"}],
         "images": ["images/red.png", "images/green.png"]}


@pytest.fixture()
def build_dir(tmp_path) -> Path:
    return write_build(tmp_path / "build", [ONE_TURN] * 8, [ONE_TURN, MULTI])


# ---------------------------------------------------------------------------------------------- tiny model


def test_tiny_model_loads_like_a_real_checkpoint(tiny_model, processor):
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["rope_scaling"]["type"] == "mrope"
    assert (tiny_model / "preprocessor_config.json").exists() and (tiny_model / "chat_template.json").exists()
    tok = processor.tokenizer
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("eos_token_id", "<|im_end|>")):
        assert config[key] == tok.convert_tokens_to_ids(token)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = processor.apply_chat_template(to_messages([("user", "<image>hi")]), tokenize=False,
                                         add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok("x^{2} \\frac{a}{b}").input_ids) == "x^{2} \\frac{a}{b}"
    assert AutoConfig.from_pretrained(tiny_model).model_type == "qwen2_vl"
    Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)
    assert sum(p.stat().st_size for p in tiny_model.iterdir()) < 5_000_000


# ---------------------------------------------------------------------------------------------- data path


def test_labels_are_exactly_the_assistant_tokens(build_dir, processor):
    info, names = resolve_split(build_dir, "val")
    assert names == ["toy_val"]
    conversations = read_conversations(info, names)
    dataset, stats = build_dataset(processor, conversations, min_pixels=3136, max_pixels=20000, cutoff_len=4096)
    assert stats.kept == 2 and not stats.dropped
    item = dataset[1]  # multi-turn, two images
    ids, labels = item["input_ids"], item["labels"]
    tok = processor.tokenizer
    # token by token: every labelled position holds its own input token, and they spell the two replies + ends
    labelled = labels != -100
    assert torch.equal(labels[labelled], ids[labelled])
    assert tok.decode(ids[labelled]) == "red<|im_end|>green \\alpha<|im_end|>"
    expected = []
    for reply in ("red", "green \\alpha"):
        expected += tok(reply, add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert labels[labelled].tolist() == expected
    # each labelled run starts right after "<|im_start|>assistant\n"
    starts = [i for i in range(1, len(ids)) if labelled[i] and not labelled[i - 1]]
    prefix = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert all(ids[s - len(prefix): s].tolist() == prefix for s in starts) and len(starts) == 2

    # the same ids, pixels and grids as the HF processor on the rendered conversation, images in order
    text = processor.apply_chat_template(to_messages(conversations[1][0]), tokenize=False)
    sample = dataset.samples[1]
    pairs = zip(sample.images, sample.sizes, strict=True)
    images = [Image.open(p).convert("RGB").resize((w, h), Image.BICUBIC) for p, (h, w) in pairs]
    ref = processor(text=[text], images=images, return_tensors="pt")
    assert torch.equal(ref["input_ids"][0], ids)
    assert torch.equal(ref["image_grid_thw"], item["image_grid_thw"])
    assert torch.allclose(ref["pixel_values"], item["pixel_values"])
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((ids == image_id).sum()) == int(item["image_grid_thw"].prod(dim=1).sum()) // 4


def test_mrope_positions_match_the_model(build_dir, processor, tiny_model):
    from transformers import Qwen2VLForConditionalGeneration

    info, names = resolve_split(build_dir, "val")
    conversations = read_conversations(info, names)
    dataset, _ = build_dataset(processor, conversations, min_pixels=3136, max_pixels=20000, cutoff_len=4096)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)
    item = dataset[1]
    ids = item["input_ids"][None]
    kwargs = {}
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = (ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
    positions, _ = model.model.get_rope_index(ids, image_grid_thw=item["image_grid_thw"],
                                              attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(positions[:, 0], item["position_ids"])


def test_smart_resize_matches_the_processor(processor):
    for width, height in ((130, 60), (60, 90), (1000, 40), (512, 512)):
        h, w = smart_resize(height, width, 28, 3136, 50000)
        out = processor.image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt",
                                        min_pixels=3136, max_pixels=50000)
        assert out["image_grid_thw"][0].tolist() == [1, h // 14, w // 14]


def test_long_samples_are_dropped_and_counted(build_dir, processor):
    info, names = resolve_split(build_dir, "val")
    _, stats = build_dataset(processor, read_conversations(info, names), min_pixels=3136, max_pixels=20000,
                             cutoff_len=60)
    assert stats.kept == 1 and stats.dropped == {"longer than cutoff_len": 1}


def test_records_the_model_cannot_take_are_dropped_and_counted_before_training(build_dir, processor):
    """A literal <|image_pad|> in the text crashed encoding (StopIteration); a cut-off image passed the header
    read and crashed a DataLoader worker mid-training."""
    png = (build_dir / "images" / "red.png").read_bytes()
    (build_dir / "images" / "cut.png").write_bytes(png[: len(png) // 2])
    pad_token = {"messages": [{"role": "user", "content": "what is <|image_pad|> ?"},
                              {"role": "assistant", "content": "a token"}], "images": []}
    cut = {**ONE_TURN, "images": ["images/cut.png"]}
    _, stats = build_dataset(processor, [([(m["role"], m["content"]) for m in r["messages"]],
                                          [str(build_dir / p) for p in r["images"]]) for r in (ONE_TURN, pad_token, cut)],
                             min_pixels=3136, max_pixels=20000, cutoff_len=512)
    assert stats.kept == 1 and sum(stats.dropped.values()) == 2
    assert any("<|image_pad|>" in reason for reason in stats.dropped), stats.dropped
    assert any("truncated" in reason or "readable" in reason for reason in stats.dropped), stats.dropped


def test_a_hand_edited_dataset_info_names_the_missing_file_or_column(build_dir):
    """A renamed messages column dropped every record as "0 <image> placeholders but 1 images"; a missing file was
    "LLaMA-Factory cannot load this file type"."""
    info_path = build_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["toy_train"]["columns"]["messages"] = "conversations"
    info_path.write_text(json.dumps(info))
    with pytest.raises(TrainError, match="a record has no 'conversations', the column entry 'toy_train' maps"):
        read_conversations(info_path, ["toy_train"])
    info["toy_train"]["columns"]["messages"] = "messages"
    info["toy_train"]["file_name"] = "nothere.json"
    info_path.write_text(json.dumps(info))
    with pytest.raises(TrainError, match="entry 'toy_train' names 'nothere.json', which does not exist"):
        read_conversations(info_path, ["toy_train"])


def test_labelled_position_losses_match_the_models_own_loss_and_gradient(build_dir, processor, tiny_model):
    """The chunked projection (padded and packed rows) and the logits fallback give the model's loss and gradient."""
    from transformers import Qwen2VLForConditionalGeneration

    from mmdata.train.loss import (
        NO_POSITIONS,
        cross_entropy_sum,
        final_norm,
        projected_cross_entropy_sum,
        tap_final_hidden_states,
    )

    info, names = resolve_split(build_dir, "val")
    dataset, _ = build_dataset(processor, read_conversations(info, names), min_pixels=3136, max_pixels=20000,
                               cutoff_len=4096)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)
    probe = model.get_decoder().layers[-1].mlp.down_proj.weight

    def loss_and_grad(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.item(), probe.grad.clone()

    def padded_or_packed(pack):
        batch = VisionSFTCollator(processor.tokenizer.pad_token_id, pack=pack)([dataset[0], dataset[1]])
        labels, positions, targets = batch.pop("labels"), batch.pop("label_positions"), batch.pop("target_labels")
        assert targets.numel() == (labels != -100).sum()
        with tap_final_hidden_states(final_norm(model)) as hidden:
            out = model(**batch, logits_to_keep=NO_POSITIONS, use_cache=False)
        assert out.logits.shape[1] == 0  # the model itself projected nothing
        weight = model.get_output_embeddings().weight
        return projected_cross_entropy_sum(hidden[-1][positions], weight, targets, chunk=7) / targets.numel()

    def from_logits():
        batch = VisionSFTCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
        batch.pop("labels")
        positions, targets = batch.pop("label_positions"), batch.pop("target_labels")
        keep = positions.any(dim=0).nonzero().squeeze(1)
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
        return cross_entropy_sum(logits[positions[:, keep]], targets, chunk=5) / targets.numel()

    def reference():  # the model's own loss over the full logits of the padded batch
        batch = VisionSFTCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
        batch.pop("label_positions"), batch.pop("target_labels")
        return model(**batch, use_cache=False).loss

    expected_loss, expected_grad = loss_and_grad(reference)
    for compute in (lambda: padded_or_packed(False), lambda: padded_or_packed(True), from_logits):
        loss, grad = loss_and_grad(compute)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)

    # a micro-batch without labelled rows still gives a differentiable zero (DDP ranks must all run backward)
    empty = torch.zeros(0, probe.shape[0], requires_grad=True)
    zero = projected_cross_entropy_sum(empty, model.get_output_embeddings().weight, torch.zeros(0, dtype=torch.long))
    zero.backward()
    assert zero.item() == 0.0 and empty.grad.shape == empty.shape


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projected_loss_takes_autograds_gradients_in_its_forward(dtype, compiled):
    """The loss's gradients, taken chunk by chunk in the forward pass (eager, and as the compiled kernel the trainer
    runs on a GPU), equal autograd's through full logits: hidden states and, where it trains, the projection weight;
    a confident target (softmax near 1, where ``p - 1`` in bf16 would lose the difference) included. Tolerance,
    relative to the largest gradient: fp32 1e-5 (sums over 1,000 logits in another order), bf16 2**-7 (two units in
    the last place: the kept gradient is rounded to bf16 once before it is scaled by the upstream gradient)."""
    from mmdata.train.loss import projected_cross_entropy_sum

    F = torch.nn.functional
    torch.manual_seed(0)
    rows, width, vocab = 37, 16, 1000
    hidden = (torch.randn(rows, width) * 2).to(dtype).requires_grad_()
    weight = torch.randn(vocab, width).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    targets[0] = int((hidden[0].float() @ weight.T).argmax())

    def gradients(loss):
        hidden.grad = weight.grad = None
        (loss * 3).backward()  # an upstream gradient other than 1 (the trainer divides by the label count)
        return loss.item(), hidden.grad.float(), weight.grad

    got = gradients(projected_cross_entropy_sum(hidden, weight, targets, chunk=8, compiled=compiled))
    expected = gradients(F.cross_entropy(F.linear(hidden, weight.to(dtype)).float(), targets, reduction="sum"))
    assert got[0] == pytest.approx(expected[0], rel=1e-6)
    for mine, reference in zip(got[1:], expected[1:], strict=True):
        scale = reference.abs().max().item()
        torch.testing.assert_close(mine, reference, rtol=0, atol=scale * (1e-5 if dtype == torch.float32 else 2**-7))
    with torch.no_grad():  # evaluation: the loss alone, no gradient kept
        assert projected_cross_entropy_sum(hidden, weight, targets).item() == pytest.approx(expected[0], rel=1e-6)
    # under the trainer's autocast (fp32 adapters on a bf16 model) the products keep the hidden states' dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = projected_cross_entropy_sum(hidden, weight, targets, chunk=8, compiled=compiled)
    assert gradients(autocast)[0] == pytest.approx(expected[0], rel=1e-6)


# ---------------------------------------------------------------------------------------------- config


def test_unknown_target_modules_fail_with_the_valid_names(tiny_model, build_dir, tmp_path):
    from mmdata.train.trainer import train

    config = load_train_config(None, model=str(tiny_model), dataset=str(build_dir), output_dir=str(tmp_path / "o"),
                               target_modules="c_attn,q_proj")
    with pytest.raises(TrainError, match=r"Target modules \{'c_attn'\} not found.*valid names: down_proj, "
                                         r"gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        train(config)


def test_config_errors_name_the_option(tmp_path):
    with pytest.raises(TrainError, match="lora_r"):
        load_train_config(None, model="m", dataset="d", lora_r=0)
    with pytest.raises(TrainError, match="min_pixels"):
        load_train_config(None, model="m", dataset="d", min_pixels=10**6, max_pixels=10**5)
    (tmp_path / "t.yaml").write_text("model: m\ndataset: d\nlora_rank: 8\n")
    with pytest.raises(TrainError, match="lora_rank"):
        load_train_config(tmp_path / "t.yaml")
    # each used to pass here: max_steps 0 trained one step, a bad scheduler failed after the model had loaded
    for steps in (0, -5):
        with pytest.raises(TrainError, match=f"max_steps: .*{steps} steps: give a number of optimizer steps >= 1"):
            load_train_config(None, model="m", dataset="d", max_steps=steps)
    with pytest.raises(TrainError, match="lr_scheduler_type: .*'bogus' is not a scheduler transformers knows"):
        load_train_config(None, model="m", dataset="d", lr_scheduler_type="bogus")


def test_a_model_without_a_chat_template_trains_with_its_familys(tiny_model, tmp_path):
    """Training refused such a folder ("add chat_template.json") while export fell back to the family's template."""
    import shutil

    from mmdata.train.families import family_of
    from mmdata.train.model import ensure_chat_template, load_processor

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.json").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    processor = load_processor(str(bare))
    assert not processor.chat_template
    with pytest.warns(UserWarning, match="has no chat template: using the qwen2_vl Instruct template"):
        ensure_chat_template(processor, family_of("qwen2_vl"), str(bare))
    assert processor.chat_template == family_of("qwen2_vl").chat_template


def test_qlora_without_cuda_is_a_clear_error(tiny_model):
    from mmdata.train.model import load_model

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(TrainError, match="needs a CUDA GPU"):
        load_model(str(tiny_model), dtype=torch.float32, quantization_bit=4)


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics():
    assert edit_distance("kitten", "sitting") == 3
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    m = compute_metrics(["x^{2}  + 1", "abc"], ["x^{2} + 1", "abd"])
    assert m["exact_match"] == 0.5 and m["cer"] == pytest.approx((0 + 1 / 3) / 2, abs=1e-6)
    assert 0 <= m["bleu"] <= 100 and 0 <= m["rouge_l"] <= 100


# ---------------------------------------------------------------------------------------------- end to end


def _curve(state: dict, key: str = "loss") -> list[float]:
    """The logged values of ``key`` (``loss``, ``eval_loss``) of a ``trainer_state.json``, in step order."""
    return [h[key] for h in state["log_history"] if key in h]


def _train_on(tiny_model, build, out, **options) -> tuple[dict, dict]:
    """``train()`` the tiny model on ``build`` with the small-run settings these tests share plus ``options``;
    returns the run record and ``trainer_state.json``."""
    from mmdata.train.trainer import train

    config = load_train_config(None, model=str(tiny_model), dataset=str(build), output_dir=str(out),
                               learning_rate=1e-2, lora_r=8, lora_alpha=16, per_device_train_batch_size=2,
                               logging_steps=1, save_steps=100, min_pixels=3136, max_pixels=20000, **options)
    record = train(config)
    return record, json.loads((out / "trainer_state.json").read_text())


def _train_cli(tiny_model, build_dir, out, steps, *extra):
    import argparse

    from mmdata.train.cli import add_train_commands

    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--model", str(tiny_model), "--dataset", str(build_dir), "--output-dir",
                              str(out), "--max-steps", str(steps), "--learning-rate", "1e-2", "--lora-r", "16",
                              "--lora-alpha", "32", "--lora-dropout", "0", "--per-device-train-batch-size", "4",
                              "--gradient-accumulation-steps", "1", "--logging-steps", "1", "--save-steps", "10",
                              "--no-gradient-checkpointing", "--min-pixels", "3136", "--max-pixels", "20000", *extra])
    assert args.func(args) == 0
    return json.loads((out / "trainer_state.json").read_text())


def test_train_resume_predict_export(tiny_model, build_dir, tmp_path):
    out = tmp_path / "run"
    state = _train_cli(tiny_model, build_dir, out, 20)
    losses = _curve(state)
    assert state["global_step"] == 20 and len(losses) == 20
    assert losses[-1] <= losses[0] / 2, losses  # 8 repeated samples are memorised
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-20").is_dir()
    record = json.loads((out / "mmdata_train.json").read_text())
    assert record["data"]["train"] == {"kept": 8, "dropped": {}} and record["batching"] == "pad"

    # resume: a later max_steps continues from checkpoint-20 instead of starting over
    state = _train_cli(tiny_model, build_dir, out, 24)
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 24 and steps[-4:] == [21, 22, 23, 24]

    # a kill during a save leaves a checkpoint without trainer_state.json (resuming from it crashed): skipped
    cut = out / "checkpoint-30"
    cut.mkdir()
    (cut / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning, match="checkpoint-30 is incomplete .* resuming from checkpoint-24"):
        state = _train_cli(tiny_model, build_dir, out, 25)
    assert state["global_step"] == 25
    shutil.rmtree(cut)
    # another LoRA shape in the same folder is another run: refused (it crashed loading the state dict)
    with pytest.raises(TrainError, match=r"checkpoint-2[45] is the checkpoint of another run \(lora_r 16 -> 8\)"):
        _train_cli(tiny_model, build_dir, out, 26, "--lora-r", "8")

    # predict with base + adapter: LLaMA-Factory's file and the metrics
    from mmdata.train.predict import predict

    pred_dir = tmp_path / "pred"
    metrics = predict(str(tiny_model), str(build_dir), str(pred_dir), adapter=str(out), max_new_tokens=12,
                      batch_size=2)
    rows = [json.loads(line) for line in (pred_dir / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]) == {"prompt", "predict", "label"}
    assert rows[1]["label"] == "green \\alpha" and rows[1]["prompt"].endswith("<|im_start|>assistant\n")
    saved = json.loads((pred_dir / "metrics.json").read_text())
    assert {"exact_match", "cer", "bleu", "rouge_l"} <= set(saved) and saved["count"] == 2 == metrics["count"]

    # export: merged weights + processor with chat template; same greedy tokens as base + adapter
    from transformers import AutoProcessor

    from mmdata.train.export import export
    from mmdata.train.predict import build_prompts, generate, load_for_inference

    merged_dir = export(str(tiny_model), str(out), str(tmp_path / "merged"))
    exported = AutoProcessor.from_pretrained(merged_dir)
    assert exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                        add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    info, names = resolve_split(build_dir, "val")
    outputs = []
    for model, adapter in ((str(tiny_model), str(out)), (str(merged_dir), None)):
        net, proc = load_for_inference(model, adapter)
        items = build_prompts(read_conversations(info, names), proc)
        outputs.append(list(generate(net, proc, items, batch_size=2, max_new_tokens=12, min_pixels=3136,
                                     max_pixels=20000)))
    assert outputs[0] == outputs[1]
    merged_metrics = predict(str(merged_dir), str(build_dir), str(tmp_path / "pred_merged"), max_new_tokens=12,
                             min_pixels=3136, max_pixels=20000)
    assert merged_metrics["count"] == 2
    # the export carries the run's record, so predict on it alone sizes images with the trained budget
    from mmdata.train.predict import _training_pixels

    assert _training_pixels(str(merged_dir)) == _training_pixels(str(out)) and _training_pixels(str(out))


def test_cli_registration_does_not_import_torch():
    code = ("import argparse, sys\nfrom mmdata.train.cli import add_train_commands\n"
            "p = argparse.ArgumentParser(); add_train_commands(p.add_subparsers(dest='c'))\n"
            "a = p.parse_args(['train', '--model', 'm', '--dataset', 'd', '--max-steps', '3'])\n"
            "assert a.max_steps == 3 and a.learning_rate is None\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bf16_model_trains_bf16_adapters_without_autocast(tiny_model, build_dir, tmp_path):
    """precision bf16 + adapter_dtype auto: bf16 LoRA weights, no autocast, and the loss still falls."""
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    state = _train_cli(tiny_model, build_dir, out, 20, "--precision", "bf16")
    losses = _curve(state)
    assert losses[-1] <= losses[0] / 2, losses
    record = json.loads((out / "mmdata_train.json").read_text())
    assert record["dtype"] == record["adapter_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.bfloat16}


def test_adapter_dtype_choices():
    from mmdata.train.model import pick_adapter_dtype

    config = load_train_config(None, model="m", dataset="d")
    assert pick_adapter_dtype(config, torch.bfloat16) == torch.bfloat16
    assert pick_adapter_dtype(config, torch.float16) == torch.float32
    fp32 = load_train_config(None, model="m", dataset="d", adapter_dtype="fp32")
    assert pick_adapter_dtype(fp32, torch.bfloat16) == torch.float32
    with pytest.raises(TrainError, match="adapter_dtype"):
        load_train_config(None, model="m", dataset="d", adapter_dtype="bf16", precision="fp16")
    with pytest.raises(TrainError, match="adapter_dtype"):
        pick_adapter_dtype(load_train_config(None, model="m", dataset="d", adapter_dtype="bf16"), torch.float32)


def test_packed_training_with_pytorchs_varlen_attention_learns(tiny_model, build_dir, tmp_path):
    """`mmdata train --attn-implementation flash_varlen_torch` packs by default (batching auto): one packed row per
    micro-batch through mmdata's attention function (on the CPU its block-diagonal-mask path), and the loss falls
    as with padded rows."""
    out = tmp_path / "packed"
    state = _train_cli(tiny_model, build_dir, out, 20, "--attn-implementation", "flash_varlen_torch")
    losses = _curve(state)
    assert losses[-1] <= losses[0] / 2, losses
    record = json.loads((out / "mmdata_train.json").read_text())
    assert record["batching"] == "pack" and record["attn_implementation"] == "flash_varlen_torch"


def test_fp32_adapters_on_a_bf16_model_train_under_autocast(tiny_model, build_dir, tmp_path):
    out = tmp_path / "amp"
    state = _train_cli(tiny_model, build_dir, out, 20, "--precision", "bf16", "--adapter-dtype", "fp32")
    losses = _curve(state)
    assert losses[-1] <= losses[0] / 2, losses
    assert json.loads((out / "mmdata_train.json").read_text())["adapter_dtype"] == "float32"


@pytest.mark.parametrize("scope", ["parts", "layers"])
def test_compiled_layers_train_like_eager_ones(tiny_model, tmp_path, scope):
    """compile: true (each decoder layer's attention, MLP and norms under torch.compile, or the whole layer with its
    checkpoint) follows the eager loss and eval-loss curves, across micro-batches of different lengths and image
    counts."""
    from torch._dynamo.utils import counters

    counters.clear()
    build = write_build(tmp_path / "mixed", [ONE_TURN, MULTI] * 4, [ONE_TURN])
    curves = {}
    for compile_ in (False, True):
        record, state = _train_on(tiny_model, build, tmp_path / f"compile_{compile_}", max_steps=6,
                                  lora_dropout=0.0, gradient_accumulation_steps=1, compile=compile_,
                                  compile_scope=scope, eval_steps=3)
        assert record["compiled"] is compile_
        curves[compile_] = _curve(state)
        curves[compile_] += _curve(state, "eval_loss")
    assert len(curves[True]) == 6 + 2  # six training losses, two evaluations on the val split
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # compiled whole, no fallback
    assert curves[True] == pytest.approx(curves[False], rel=2e-3)


def test_compiled_vision_blocks_train_like_an_eager_tower(tiny_model, tmp_path):
    """compile_vision (on by default with compile and flash attention): the frozen tower's blocks compile whole, no
    graph break, and the loss and eval-loss curves equal those of an eager tower; under SDPA (the tower splits by
    image on the host) the tower stays eager."""
    from torch._dynamo.utils import counters

    build = write_build(tmp_path / "mixed", [ONE_TURN, MULTI] * 4, [ONE_TURN])
    curves = {}
    for compile_vision in (False, True):
        counters.clear()
        record, state = _train_on(tiny_model, build, tmp_path / f"vision_{compile_vision}", max_steps=4,
                                  lora_dropout=0.0, gradient_accumulation_steps=1, compile=True, eval_steps=2,
                                  attn_implementation="flash_varlen_torch", compile_vision=compile_vision)
        assert record["compiled_vision"] is compile_vision
        assert not counters["graph_break"]
        curves[compile_vision] = _curve(state) + _curve(state, "eval_loss")
    assert curves[True] == pytest.approx(curves[False], rel=2e-3)
    record, _ = _train_on(tiny_model, build, tmp_path / "sdpa", max_steps=1, compile=True, attn_implementation="sdpa")
    assert record["compiled"] and record["compiled_vision"] is False


def test_compiled_whole_layers_train_with_dropout_as_without_checkpointing(tiny_model, tmp_path):
    """compile_scope: layers with LoRA dropout: the trainer checkpoints keeping the dropout masks, so a checkpointed
    run's loss curve is the one without checkpointing (a recomputation that drew new masks would change every
    adapter gradient from the first step on)."""
    build = write_build(tmp_path / "mixed", [ONE_TURN, MULTI] * 4, [ONE_TURN])
    curves = {}
    for checkpointing in (True, False):
        _, state = _train_on(tiny_model, build, tmp_path / f"checkpointing_{checkpointing}", max_steps=5,
                             lora_dropout=0.3, compile=True, compile_scope="layers",
                             gradient_checkpointing=checkpointing)
        curves[checkpointing] = _curve(state)
    assert len(curves[True]) == 5
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)


def test_packing_is_llamafactorys_spelling_of_batching_pack():
    """packing: true / --packing means batching: pack, false means pad; a contradiction names both options."""
    from mmdata.train.cli import add_train_commands

    assert load_train_config(None, model="m", dataset="d", packing=True).batching == "pack"
    assert load_train_config(None, model="m", dataset="d", packing=False).batching == "pad"
    assert load_train_config(None, model="m", dataset="d").batching == "auto"
    with pytest.raises(TrainError, match="packing: false contradicts batching: pack"):
        load_train_config(None, model="m", dataset="d", packing=False, batching="pack")
    import argparse

    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers())
    args = parser.parse_args(["train", "--packing", "--attn-implementation", "flash_varlen_torch"])
    assert args.packing is True and args.attn_implementation == "flash_varlen_torch"


def test_attention_choice_for_training_and_generation():
    """auto trains with flash_attention_2 (flash-attn installed), else PyTorch's variable-length kernel on a GPU,
    else SDPA; generation never gets the training-only function."""
    from mmdata.train.attention import ATTENTION_NAME, torch_varlen_available
    from mmdata.train.model import pick_attention

    expected = "sdpa"
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("flash_attn"):
            expected = "flash_attention_2"
        elif torch_varlen_available():
            expected = ATTENTION_NAME
    assert pick_attention("auto") == expected
    assert pick_attention("auto", training=False) in ("sdpa", "flash_attention_2")
    assert pick_attention(ATTENTION_NAME) == ATTENTION_NAME  # explicit: also on the CPU (records one by one)


def test_compile_choices():
    from mmdata.train.model import should_compile

    if not torch.cuda.is_available():  # auto is for CUDA; true forces it (CPU inductor, as in the tests here)
        assert should_compile(load_train_config(None, model="m", dataset="d")) is False
    assert should_compile(load_train_config(None, model="m", dataset="d", compile="true")) is True
    with pytest.raises(TrainError, match="compile"):
        load_train_config(None, model="m", dataset="d", compile=True, deepspeed="ds.json")


@pytest.mark.parametrize("scope", ["parts", "layers"])
def test_compiled_layers_replay_lora_dropout_masks_under_checkpointing(tiny_model, scope):
    """With dropout on, a checkpointed compiled step recomputes the forward's masks: gradients equal those of the
    same step without checkpointing (a different mask would change every adapter's gradient), whether the layers'
    parts or the whole layers are compiled (then checkpointed as the trainer does: keeping dropout masks)."""
    from mmdata.train.model import attach_lora, compile_language_layers, enable_checkpointing, load_model

    config = load_train_config(None, model=str(tiny_model), dataset="d", lora_dropout=0.3, lora_r=8)

    def gradients(checkpointing: bool) -> dict:
        torch.manual_seed(0)
        model = attach_lora(load_model(str(tiny_model), dtype=torch.float32), config)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would hide the masks from the A gradients
                torch.nn.init.normal_(param, std=0.1)
        if checkpointing:
            enable_checkpointing(model, keep_dropout=scope == "layers")
        model.train()
        compile_language_layers(model, scope)
        grads = []
        for length in (40, 72):
            torch.manual_seed(length)
            ids = torch.randint(0, 500, (2, length))
            model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            model.zero_grad()
        return grads

    with_checkpoint, without = gradients(True), gradients(False)
    for a, b in zip(with_checkpoint, without, strict=True):
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_wide_projections_give_peft_gradients(tiny_model, compiled):
    """gate_proj and up_proj computed with their LoRA update as one product (model.fuse_lora_into_wide_projections,
    what the trainer does where it compiles) give PEFT's outputs and every adapter's gradient, dropout on, eager and
    in compiled checkpointed layers as the trainer runs them; the narrower projections stay PEFT's."""
    from mmdata.train.model import (
        attach_lora,
        compile_language_layers,
        enable_checkpointing,
        fuse_lora_into_wide_projections,
        language_model,
        load_model,
    )

    config = load_train_config(None, model=str(tiny_model), dataset="d", lora_dropout=0.3, lora_r=8)

    def outputs_and_gradients(fused: bool) -> list:
        torch.manual_seed(0)
        model = attach_lora(load_model(str(tiny_model), dtype=torch.float32), config)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would hide A's gradients
                torch.nn.init.normal_(param, std=0.1)
        layers = language_model(model).layers
        if fused:
            assert fuse_lora_into_wide_projections(model) == 2 * len(layers)
            assert "forward" in vars(layers[0].mlp.up_proj) and "forward" not in vars(layers[0].mlp.down_proj)
        if compiled:
            enable_checkpointing(model, keep_dropout=True)
            compile_language_layers(model)
        model.train()
        results = []
        for length in (40, 72):
            torch.manual_seed(length)
            ids = torch.randint(0, 500, (2, length))
            logits = model(input_ids=ids, use_cache=False).logits.float()
            logits.logsumexp(-1).mean().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((logits.detach(), grads))
            model.zero_grad()
        return results

    for (fused_logits, fused_grads), (logits, grads) in zip(outputs_and_gradients(True), outputs_and_gradients(False),
                                                            strict=True):
        torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
        assert fused_grads.keys() == grads.keys() and any("up_proj.lora_B" in n for n in grads)
        for name in grads:
            torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6)
    dora = load_train_config(None, model=str(tiny_model), dataset="d", lora_r=8, use_dora=True)
    assert fuse_lora_into_wide_projections(attach_lora(load_model(str(tiny_model), dtype=torch.float32), dora)) == 0


@pytest.mark.parametrize("lora_vision", [False, True])
def test_frozen_vision_tower_is_not_differentiated(build_dir, processor, tiny_model, lora_vision):
    """Gradient checkpointing hooks the patch embedding to require grad; a frozen tower must still run without
    autograd (no recompute, no backward), while LoRA on the vision blocks keeps it differentiable."""
    from mmdata.train.model import attach_lora, load_model, run_frozen_vision_without_grad

    config = load_train_config(None, model=str(tiny_model), dataset="d", lora_vision=lora_vision)
    model = attach_lora(load_model(str(tiny_model), dtype=torch.float32), config)
    assert run_frozen_vision_without_grad(model) is not lora_vision
    if not lora_vision:  # the no-grad forward belongs to the module, so a copy runs its own weights
        copied = copy.deepcopy(model).get_base_model().model.visual
        assert copied.forward.__self__ is copied
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as Trainer does
    model.train()
    info, names = resolve_split(build_dir, "train")
    dataset, _ = build_dataset(processor, read_conversations(info, names), min_pixels=3136, max_pixels=20000,
                               cutoff_len=4096)
    batch = VisionSFTCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    seen = []
    visual = model.get_base_model().model.visual
    handle = visual.register_forward_hook(lambda _m, _i, out: seen.append(out))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw")}
    out = model(**inputs, use_cache=False)
    handle.remove()
    features = seen[0] if isinstance(seen[0], torch.Tensor) else seen[0][0]  # a tensor, or a model output
    assert features.requires_grad is lora_vision
    out.logits.float().mean().backward()  # the adapters of the language model still get gradients
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and "visual" not in n)


def test_two_process_ddp_matches_one_process_at_equal_global_batch(tiny_model, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU) with 2 samples per process trains like one process with 2 x 2
    accumulation: same loss curve, same adapter weights, and the saved adapter reloads with PEFT."""
    import socket

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration

    build = write_build(tmp_path / "mixed", [ONE_TURN, MULTI] * 8, [ONE_TURN])
    common = ["--model", str(tiny_model), "--dataset", str(build), "--max-steps", "4", "--learning-rate", "1e-2",
              "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--per-device-train-batch-size", "2",
              "--logging-steps", "1", "--save-steps", "100", "--min-pixels", "3136", "--max-pixels", "20000",
              "--compile", "false"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    runs = {"ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                    "-m", "mmdata.cli", "train", "--output-dir", str(tmp_path / "ddp"),
                    "--gradient-accumulation-steps", "1", *common],
            "single": [sys.executable, "-m", "mmdata.cli", "train", "--output-dir", str(tmp_path / "single"),
                       "--gradient-accumulation-steps", "2", *common]}
    curves, adapters = {}, {}
    for name, command in runs.items():
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        assert state["global_step"] == 4
        curves[name] = _curve(state)
        adapters[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    assert curves["ddp"] == pytest.approx(curves["single"], rel=1e-4)
    assert adapters["ddp"].keys() == adapters["single"].keys()
    for key in adapters["ddp"]:
        torch.testing.assert_close(adapters["ddp"][key], adapters["single"][key], rtol=1e-3, atol=1e-5)
    net = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(tiny_model), tmp_path / "ddp")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(net(input_ids=ids, labels=ids).loss)


def test_split_entries_are_found_when_dataset_info_lives_elsewhere(tmp_path):
    """``output.dataset_info`` outside the build folder: the trainer finds the split entries from the build folder
    (its manifest says where they are registered) and from the dataset_info.json itself."""
    import mmdata
    from mmdata.train.data import resolve_split

    src = tmp_path / "src"
    src.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(6)]
    (src / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    info = tmp_path / "LLaMA-Factory" / "data" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"other_train": {"file_name": "o.json"}, "other_val": {"file_name": "v.json"}}))
    (src / "r.yaml").write_text(json.dumps({"name": "mine", "source": {"type": "jsonl", "path": "d.jsonl"},
                                            "split": {"val": 2}, "output": {"dir": str(tmp_path / "out"),
                                                                            "dataset_info": str(info)}}))
    mmdata.build(str(src / "r.yaml"), num_proc=1)
    assert not (tmp_path / "out" / "dataset_info.json").exists()
    for where in (tmp_path / "out", info):
        assert resolve_split(where, "train") == (info, ["mine_train"])
        assert resolve_split(where, "val") == (info, ["mine_val"])


def test_a_thinking_models_thought_is_kept_apart_and_only_the_answer_is_scored():
    from mmdata.train.metrics import compute_metrics
    from mmdata.train.predict import split_thought

    assert split_thought("\n</think>\n\nok") == ("", "ok")  # Qwen3-VL-Thinking: generation starts inside <think>
    assert split_thought("<think>\nthe sum is 4\n</think>\n\n4") == ("the sum is 4", "4")
    assert split_thought("<think>still thinking") == ("still thinking", "")  # cut off: no answer
    assert split_thought("plain answer") == (None, "plain answer")
    assert compute_metrics([split_thought("\n</think>\n\nok")[1]], ["ok"])["exact_match"] == 1.0


def test_a_modelscope_download_that_fails_is_one_error(monkeypatch):
    """--model-hub modelscope offline printed five chained tracebacks; it is one TrainError naming the model."""
    modelscope = pytest.importorskip("modelscope")
    from mmdata.train.model import resolve_model_path

    def offline(model_id, *args, **kwargs):
        raise ConnectionError("Connection failed: modelscope.cn")

    monkeypatch.setattr(modelscope, "snapshot_download", offline)
    with pytest.raises(TrainError, match=r"Qwen/Qwen2-VL-2B-Instruct: cannot download it from ModelScope \(Connection"):
        resolve_model_path("Qwen/Qwen2-VL-2B-Instruct", "modelscope")


def test_rerunning_a_finished_run_trains_nothing_more(tiny_model, tmp_path):
    """The same command again (resume is on by default) resumed the finished run by one more step when max_steps
    ended mid-epoch: the adapter moved and a checkpoint was rotated out."""
    from mmdata.train.trainer import train

    build = write_build(tmp_path / "b", [ONE_TURN, MULTI] * 4, [ONE_TURN])  # 4 steps an epoch: 3 ends mid-epoch
    out = tmp_path / "run"

    def run(steps: int) -> dict:
        return train(load_train_config(None, model=str(tiny_model), dataset=str(build), output_dir=str(out),
                                       learning_rate=1e-2, lora_r=8, per_device_train_batch_size=2,
                                       gradient_accumulation_steps=1, max_steps=steps, save_steps=3,
                                       logging_steps=1, min_pixels=3136, max_pixels=20000))

    first = run(3)
    adapter = (out / "adapter_model.safetensors").read_bytes()
    with pytest.warns(UserWarning, match="already reached step 3 of 3; nothing to train"):
        again = run(3)
    assert again["global_step"] == first["global_step"] == 3
    assert (out / "adapter_model.safetensors").read_bytes() == adapter and (out / "checkpoint-3").is_dir()
    assert run(5)["global_step"] == 5  # a larger max_steps continues it


def test_predict_skips_records_the_trainer_drops_and_metrics_score_cjk_and_short_answers(tmp_path):
    """A val record with <image> but no image crashed generate mid-run; BLEU was 0 for perfect Chinese answers and
    for right yes/no answers, and ROUGE-L split one-word strings into characters."""
    from collections import Counter

    from mmdata.train.metrics import compute_metrics, rouge_l
    from mmdata.train.predict import build_prompts

    class Template:
        def apply_chat_template(self, messages, **kwargs):
            return str(messages)

    skipped: Counter = Counter()
    conversations = [([("user", "What is <image>?"), ("assistant", "x")], []),
                     ([("user", "<image>Where?"), ("assistant", "y")], [str(tmp_path / "missing.png")]),
                     ([("user", "Fine?"), ("assistant", "yes")], [])]
    items = build_prompts(conversations, Template(), skipped)
    assert [i["label"] for i in items] == ["yes"] and sum(skipped.values()) == 2
    assert compute_metrics(["肝脏", "是的"], ["肝脏", "是的"])["bleu"] == pytest.approx(100)
    assert compute_metrics(["yes", "no"], ["yes", "no"])["bleu"] == pytest.approx(100)
    assert rouge_l("yes it is", "yes") == pytest.approx(0.5) and rouge_l("cab", "abc") == 0.0
    assert rouge_l("肝脏", "肝") == pytest.approx(2 / 3)


def test_records_validate_calls_errors_are_dropped_not_trained(build_dir, processor):
    """Raw LLaMA-Factory data that `validate` flags trained as "None<|im_end|>", "nan<|im_end|>", an empty label,
    a last user turn; each is now dropped and counted by its reason."""
    image = str(build_dir / "images" / "red.png")
    good = ([("user", "<image>Which colour?"), ("assistant", "red")], [image])
    bad = [([("user", "<image>Which colour?"), ("assistant", None)], [image]),
           ([("user", "<image>Which colour?"), ("assistant", float("nan"))], [image]),
           ([("user", "<image>Which colour?"), ("assistant", "   ")], [image]),
           ([("user", "<image>Which colour?"), ("assistant", "red"), ("user", "and?")], [image]),
           ([("system", "<image> is a picture"), ("user", "Which colour?"), ("assistant", "red")], [image])]
    dataset, stats = build_dataset(processor, [good, *bad], min_pixels=3136, max_pixels=20000, cutoff_len=512)
    assert stats.kept == 1 and sum(stats.dropped.values()) == len(bad), stats.dropped
    assert any("content is NoneType" in reason for reason in stats.dropped)
    assert any("ends with a user turn" in reason for reason in stats.dropped)
    labels = dataset[0]["labels"]
    assert processor.tokenizer.decode(labels[labels != -100]) == "red<|im_end|>"
