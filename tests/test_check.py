"""``mmdata validate``: each defect on a small broken dataset in tmp_path is caught with entry, record and fix;
a clean dataset passes; LLaMA-Factory's own dataset_info.json raises no false errors."""

import json
import os
from pathlib import Path

import pytest
from tests.conftest import LLAMAFACTORY_INFO, jpeg_bytes, png_bytes

from mmdata import lfdata
from mmdata.check import lint_entry, validate
from mmdata.cli import main

MLLM_ENTRY = {"file_name": "mllm.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
              "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


def record(question="<image>What is shown?", answer="A red square.", images=("images/a.jpg",)):
    rec = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if images is not None:
        rec["images"] = list(images)
    return rec


def make_dataset(root: Path, records=None, entry=None, name="mllm", info_extra=None, jsonl=False) -> Path:
    """A LLaMA-Factory dataset folder: dataset_info.json, one data file, images/a.jpg and images/b.png."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / "a.jpg").write_bytes(jpeg_bytes((64, 48)))
    (root / "images" / "b.png").write_bytes(png_bytes((30, 30)))
    entry = dict(entry or MLLM_ENTRY)
    records = [record(), record("Which color? <image>", "Blue.", ["images/b.png"])] if records is None else records
    data = root / entry.get("file_name", "mllm.json")
    data.parent.mkdir(parents=True, exist_ok=True)
    if data.suffix == ".jsonl" or jsonl:
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        data.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    info = {name: entry, **(info_extra or {})}
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return root / "dataset_info.json"


def codes(report, severity="error"):
    return [p.code for p in report.problems if p.severity == severity]


def only(report, code):
    found = [p for p in report.problems if p.code == code]
    assert found, f"no {code!r} problem in:\n{report.format_text()}"
    return found[0]


# ------------------------------------------------------------------------------------------------ clean data


def test_clean_sharegpt_dataset_passes(tmp_path, capsys):
    info = make_dataset(tmp_path)
    report = validate(info)
    assert report.ok and not report.problems, report.format_text()
    assert report.entries["mllm"].records == 2
    assert main(["validate", str(tmp_path)]) == 0
    assert "OK: 0 error(s), 0 warning(s)" in capsys.readouterr().out


def test_clean_alpaca_dataset_with_history_passes(tmp_path):
    records = [{"instruction": "<image>Describe.", "input": "", "output": "A square.", "images": ["images/a.jpg"],
                "history": [["Hi", "Hello!"]]}]
    entry = {"file_name": "alpaca.jsonl", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                      "history": "history", "images": "images"}}
    report = validate(make_dataset(tmp_path, records, entry))
    assert report.ok and not report.problems, report.format_text()


def test_pretraining_text_entry_is_not_held_to_conversation_rules(tmp_path):
    entry = {"file_name": "c4.jsonl", "columns": {"prompt": "text"}}  # like LLaMA-Factory's c4_demo
    report = validate(make_dataset(tmp_path, [{"text": "plain text"}, {"text": "more"}], entry))
    assert report.ok and not report.problems, report.format_text()


# ------------------------------------------------------------------------------------- dataset_info.json schema


def test_misspelled_key_suggests_the_real_one(tmp_path):
    entry = {**MLLM_ENTRY, "format": "sharegpt"}
    del entry["formatting"]
    report = validate(make_dataset(tmp_path, entry=entry))
    problem = only(report, "unknown-key")
    assert problem.severity == "error" and problem.entry == "mllm" and "'format'" in problem.message
    assert "did you mean 'formatting'?" in problem.fix
    assert not report.ok


def test_wrong_formatting_value(tmp_path):
    report = validate(make_dataset(tmp_path, entry={**MLLM_ENTRY, "formatting": "sharegtp"}))
    problem = only(report, "bad-formatting")
    assert "did you mean 'sharegpt'?" in problem.fix and "Dataset converter sharegtp not found" in problem.message


def test_wrong_columns(tmp_path):
    entry = {**MLLM_ENTRY, "columns": {"messages": "messages", "image": "images"}}
    report = validate(make_dataset(tmp_path, entry=entry))
    problem = only(report, "bad-columns")
    assert "'image'" in problem.message and "did you mean 'images'?" in problem.fix
    # the data has an images field the entry no longer maps: the model would never see the images
    assert "unmapped-column" in codes(report)


def test_columns_without_messages_for_sharegpt(tmp_path):
    problems = lint_entry("x", {"file_name": "x.json", "formatting": "sharegpt", "columns": {"images": "images"}})
    assert [p.code for p in problems] == ["bad-columns"]
    assert "add \"messages\"" in problems[0].fix


def test_wrong_tags(tmp_path):
    tags = {"role_tag": "role", "content_tag": "content", "assistant_tag": "assistant"}  # user_tag forgotten
    report = validate(make_dataset(tmp_path, entry={**MLLM_ENTRY, "tags": tags}))
    problem = only(report, "bad-tags")
    assert "user_tag" in problem.message and '"user_tag": "human"' in problem.fix
    assert "unknown-role" in codes(report)  # and every record's 'user' role then matches no tag


def test_openai_style_messages_without_tags(tmp_path):
    entry = {"file_name": "mllm.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"}}
    report = validate(make_dataset(tmp_path, entry=entry))
    problem = only(report, "message-keys")
    assert problem.record == 0 and "'from'" in problem.message and '"role_tag": "role"' in problem.fix


def test_messages_under_another_field_name(tmp_path):
    entry = {"file_name": "mllm.json", "formatting": "sharegpt", "tags": MLLM_ENTRY["tags"]}  # messages defaults
    report = validate(make_dataset(tmp_path, entry=entry))
    problem = only(report, "missing-column")
    assert "'conversations'" in problem.message and '"messages": "messages"' in problem.fix


def test_hub_entries_are_skipped_with_a_note(tmp_path):
    info = make_dataset(tmp_path, info_extra={"remote": {"hf_hub_url": "org/data", "formatting": "sharegpt"}})
    report = validate(info)
    assert report.ok
    note = only(report, "skipped")
    assert note.severity == "info" and note.entry == "remote" and "not checked offline" in note.message


# --------------------------------------------------------------------------------------------- files


def test_missing_data_file_suggests_the_close_name(tmp_path):
    info = make_dataset(tmp_path)
    (tmp_path / "mllm.json").rename(tmp_path / "mllm_data.json")
    entry = json.loads(info.read_text())
    entry["mllm"]["file_name"] = "mllm_dat.json"
    info.write_text(json.dumps(entry))
    problem = only(validate(info), "missing-file")
    assert problem.entry == "mllm" and "'mllm_dat.json' not found" in problem.message
    assert "did you mean 'mllm_data.json'?" in problem.fix


def test_folder_with_a_hidden_file_cannot_be_loaded(tmp_path):
    info = make_dataset(tmp_path, entry={**MLLM_ENTRY, "file_name": "shards/part-0.jsonl"})
    entry = json.loads(info.read_text())
    entry["mllm"]["file_name"] = "shards"
    info.write_text(json.dumps(entry))
    (tmp_path / "shards" / ".DS_Store").write_bytes(b"\0")
    problem = only(validate(info), "file-types")
    assert ".DS_Store" in problem.message and "hidden" in problem.fix


def test_folder_of_shards_reports_the_file(tmp_path):
    info = make_dataset(tmp_path, [record()], entry={**MLLM_ENTRY, "file_name": "shards/part-00000.jsonl"})
    (tmp_path / "shards" / "part-00001.jsonl").write_text(json.dumps(record("no placeholder")) + "\n")
    entry = json.loads(info.read_text())
    entry["mllm"]["file_name"] = "shards"
    info.write_text(json.dumps(entry))
    problem = only(validate(info), "placeholder-count")
    assert problem.record == 1 and problem.file == "shards/part-00001.jsonl"


def test_truncated_json_file(tmp_path):
    info = make_dataset(tmp_path)
    data = tmp_path / "mllm.json"
    data.write_text(data.read_text()[:-40])
    report = validate(info)
    problem = only(report, "bad-file")
    assert "not valid JSON" in problem.message and not report.ok


# ------------------------------------------------------------------------------------------- records


def test_role_order(tmp_path):
    bad = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "user", "content": "Again"},
                        {"role": "assistant", "content": "Hello"}], "images": ["images/a.jpg"]}
    report = validate(make_dataset(tmp_path, [record(), bad]))
    problem = only(report, "conversation")
    assert problem.entry == "mllm" and problem.record == 1
    assert "'user' but 'assistant' was expected" in problem.message and "alternate" in problem.fix


def test_unknown_role(tmp_path):
    bad = {"messages": [{"role": "human", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello"}],
           "images": ["images/a.jpg"]}
    problem = only(validate(make_dataset(tmp_path, [bad])), "unknown-role")
    assert "'human'" in problem.message and '"user_tag": "human"' in problem.fix


def test_image_placeholder_count_mismatch_hints_at_literal_text(tmp_path):
    bad = record("Explain the <image> tag in HTML and <image>", images=["images/a.jpg"])
    problem = only(validate(make_dataset(tmp_path, [record(), bad])), "placeholder-count")
    assert problem.record == 1 and "2 <image> placeholder(s) but 1 image(s)" in problem.message
    assert "literal text, escape or remove it" in problem.fix


def test_placeholder_in_the_answer_is_flagged_as_probably_literal(tmp_path):
    odd = record("What is shown?", "Use an <image> tag.", images=["images/a.jpg"])
    report = validate(make_dataset(tmp_path, [odd]))
    assert only(report, "placeholder-in-answer").severity == "warning"


def test_a_placeholder_in_the_system_prompt_is_an_error(tmp_path):
    """LLaMA-Factory takes the system prompt out, counts 0 placeholders for 1 image and fails; it passed here."""
    entry = {**MLLM_ENTRY, "tags": {**MLLM_ENTRY["tags"], "system_tag": "system"}}
    rec = record("x")
    rec["messages"].insert(0, {"role": "system", "content": "<image>look"})
    report = validate(make_dataset(tmp_path, [rec], entry))
    assert not report.ok and any("placeholder in the system prompt" in p.message for p in report.problems)


@pytest.mark.parametrize("content", ["", "[]"], ids=["empty file", "empty array"])
def test_an_entry_with_no_record_is_an_error(tmp_path, content):
    """LLaMA-Factory fails on both (DatasetGenerationError / 'corresponds to no data'); both passed as OK."""
    info = make_dataset(tmp_path)
    (tmp_path / "mllm.json").write_text(content)
    report = validate(info)
    assert codes(report) == ["empty"] and not report.ok


def test_a_bom_is_skipped_in_json_lines_and_named_before_a_json_array(tmp_path):
    """pyarrow (LLaMA-Factory's reader) skips a BOM in JSON Lines, which validate called invalid JSON; before an array
    LLaMA-Factory fails, and the error now says why."""
    info = make_dataset(tmp_path, entry={**MLLM_ENTRY, "file_name": "mllm.jsonl"})
    data = tmp_path / "mllm.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    assert validate(info).ok
    array = make_dataset(tmp_path / "array")
    (tmp_path / "array" / "mllm.json").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "array" / "mllm.json").read_bytes())
    assert any("byte-order mark" in p.message for p in validate(array).problems)


def test_bad_counts_on_the_command_line_are_refused(tmp_path, capsys):
    """--max-records -1 checked nothing and passed; --record-tokens into a missing folder was a traceback."""
    info = make_dataset(tmp_path)
    for flag, value in (("--max-records", "-1"), ("--cutoff-len", "0"), ("--image-max-pixels", "-1")):
        with pytest.raises(SystemExit) as exit_info:
            main(["validate", str(info), flag, value])
        assert exit_info.value.code == 2 and "must be 1 or more" in capsys.readouterr().err
    assert main(["validate", str(info), "--record-tokens", str(tmp_path / "no" / "such" / "t.jsonl")]) != 0
    assert "cannot write it" in capsys.readouterr().err


def test_an_untyped_file_is_an_error_only_where_llamafactory_reads_it_first(tmp_path):
    """datasets types the columns from the first chunk of the file os.listdir lists first; an untyped file listed
    later loads (LLaMA-Factory loaded it) and is a warning that names the order it depends on."""
    entry = {**MLLM_ENTRY, "file_name": "shards"}
    info = make_dataset(tmp_path, [record()], entry)
    shards = tmp_path / "shards"
    shards.unlink()  # make_dataset wrote the records as one file of that name
    shards.mkdir()
    (shards / "a.jsonl").write_text(json.dumps(record()) + "\n")
    (shards / "z.jsonl").write_text(json.dumps(record("Text only?", "Yes.", ())) + "\n")
    report = validate(info)
    untyped = only(report, "untyped-first-chunk")
    first = os.listdir(shards)[0]
    assert untyped.severity == ("error" if first == "z.jsonl" else "warning")
    assert report.ok == (first == "a.jsonl")


def test_a_looping_data_link_and_an_image_that_is_a_folder_say_so(tmp_path):
    """Both read as "not found"/"missing", the first with a suggestion of its own name."""
    info = make_dataset(tmp_path, [record(images=["images"])])
    report = validate(info)
    assert "is a folder, not an image" in only(report, "image-unreadable").message
    (tmp_path / "mllm.json").unlink()
    (tmp_path / "mllm.json").symlink_to("mllm.json")
    assert "a broken or looping link" in only(validate(info), "missing-file").message


@pytest.mark.parametrize("call, ok", [('{"name": "f", "arguments": {}}', True), ("not json", False),
                                      ('{"name": "f"}', False), ('[{"name": "f", "arguments": {"x": 1}}]', True)])
def test_a_function_call_must_be_what_llamafactorys_formatter_reads(tmp_path, call, ok):
    """LLaMA-Factory fails on the bad ones ('Invalid JSON format in function message', KeyError 'arguments')."""
    turns = [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": call},
             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]
    entry = {"file_name": "tools.json", "formatting": "sharegpt"}
    report = validate(make_dataset(tmp_path, [{"conversations": turns}], entry))
    assert report.ok == ok, report.format_text()


def test_openai_tool_calls_and_consecutive_tool_messages_are_read_as_llamafactory_does(tmp_path):
    """LLaMA-Factory's openai converter makes tool_calls one function turn and merges tool messages; validate
    reported "turn 3 is 'user'" and an empty assistant message for a record LLaMA-Factory loads."""
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "observation_tag": "tool", "function_tag": "function_call"}
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"},
                {"role": "assistant", "content": "Sunny."}]
    entry = {"file_name": "oai.json", "formatting": "openai", "columns": {"messages": "messages"}, "tags": tags}
    report = validate(make_dataset(tmp_path, [{"messages": messages}], entry))
    assert report.ok, report.format_text()
    turns, _, _ = lfdata.to_turns({"messages": messages}, lfdata.parse_entry("x", entry))
    assert [role for role, _ in turns] == ["user", "function", "observation", "assistant"]


def test_missing_image(tmp_path):
    report = validate(make_dataset(tmp_path, [record(), record(images=["images/nope.jpg"])]))
    problem = only(report, "image-missing")
    assert problem.record == 1 and "nope.jpg" in problem.message and "media_dir" in problem.fix


def test_unreadable_image(tmp_path):
    info = make_dataset(tmp_path, [record(images=["images/broken.jpg"])])
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not an image at all")
    problem = only(validate(info), "image-unreadable")
    assert problem.record == 0 and "broken.jpg" in problem.message


def test_truncated_image_is_caught_by_full_decode(tmp_path):
    info = make_dataset(tmp_path, [record(images=["images/cut.png"])])
    (tmp_path / "images" / "cut.png").write_bytes(png_bytes((200, 200))[:-30])
    assert "image-unreadable" in codes(validate(info, decode_images=True))


def test_absolute_image_paths_and_media_dir(tmp_path):
    data, media = tmp_path / "data", tmp_path / "media"
    make_dataset(media)  # writes media/images/a.jpg
    info = make_dataset(data, [record(images=[str(media / "images" / "a.jpg")])])
    assert validate(info).ok
    info = make_dataset(data, [record(images=["images/a.jpg"])])
    (data / "images" / "a.jpg").unlink()
    assert not validate(info).ok
    assert validate(info, media_dir=str(media)).ok


def test_column_type_change_between_rows(tmp_path):
    bare = record()
    bare["images"] = "images/a.jpg"  # a string here, a list in record 0
    problem = only(validate(make_dataset(tmp_path, [record(), record(), bare])), "type-change")
    assert problem.record == 2 and "'images' is a string here but a list of string in record 0" in problem.message
    assert "one-item list" in problem.fix


def test_undefined_dataset_name(tmp_path, capsys):
    info = make_dataset(tmp_path)
    report = validate(info, ["mlm"])
    problem = only(report, "undefined-dataset")
    assert problem.message == "Undefined dataset mlm in dataset_info.json" and "did you mean 'mllm'?" in problem.fix
    assert main(["validate", str(info), "--dataset", "mllm,mlm"]) == 1
    assert "Undefined dataset mlm" in capsys.readouterr().out


def test_many_bad_records_are_counted_not_all_kept(tmp_path):
    report = validate(make_dataset(tmp_path, [record("no placeholder")] * 50), max_per_kind=5)
    assert len([p for p in report.problems if p.code == "placeholder-count"]) == 5
    assert report.count("error") == 50
    assert "45 more 'placeholder-count'" in report.format_text()


def test_max_records_checks_only_the_first(tmp_path):
    report = validate(make_dataset(tmp_path, [record()] * 3 + [record("no placeholder")]), max_records=3)
    assert report.ok and report.entries["mllm"].records == 3


# ------------------------------------------------------------------------------------------- tokens


def test_cutoff_len_reports_truncated_records_and_the_p99_cutoff(tmp_path):
    long = record("<image>" + "word " * 400)
    report = validate(make_dataset(tmp_path, [record(), long]), cutoff_len=200)
    problem = only(report, "over-cutoff")
    assert problem.record == 1 and problem.severity == "warning" and "exceed cutoff_len 200" in problem.message
    note = only(report, "tokens")
    assert "1 of 2 records (50.0%) over cutoff_len 200" in note.message and "estimated" in note.message
    assert "keeps 99%" in note.fix
    assert report.ok  # truncation is a warning
    summary = report.to_dict()["entries"]["mllm"]["tokens"]
    assert summary["over_cutoff"] == 1 and summary["suggested_cutoff_len"] >= summary["max"]


# ---------------------------------------------------------------------------------- LLaMA-Factory's own file

needs_lf_info = pytest.mark.skipif(not LLAMAFACTORY_INFO.is_file(),
                                   reason="the shared LLaMA-Factory fixture (../shared) is not beside this clone")


@needs_lf_info
def test_llamafactory_dataset_info_has_no_schema_errors():
    info = json.loads(LLAMAFACTORY_INFO.read_text())
    problems = [p for name, entry in info.items() for p in lint_entry(name, entry)]
    assert not problems, [p.format() for p in problems]


@needs_lf_info
def test_llamafactory_dataset_info_only_misses_its_local_files():
    report = validate(LLAMAFACTORY_INFO)
    info = json.loads(LLAMAFACTORY_INFO.read_text())
    local = {n for n, e in info.items() if "file_name" in e}
    assert {p.entry for p in report.errors} == local  # the data files are not shipped with the fixture
    assert set(codes(report)) == {"missing-file"} and not codes(report, "warning")
    hub = validate(LLAMAFACTORY_INFO, ["mllm_demo"])
    assert {p.entry for p in hub.errors} == {"mllm_demo"}


def test_json_output(tmp_path, capsys):
    info = make_dataset(tmp_path, [record("no placeholder")])
    assert main(["validate", str(info), "--json", "--cutoff-len", "1024"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["counts"]["error"] == 1
    assert out["problems"][0]["code"] == "placeholder-count" and out["problems"][0]["record"] == 0
    assert out["entries"]["mllm"]["tokens"]["cutoff_len"] == 1024


# ------------------------------------------------------------------------------ lfdata reads like LLaMA-Factory


def test_json_arrays_stream_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(lfdata, "_CHUNK", 5)
    records = [{"n": i, "s": "x" * i, "l": [1.5, {"k": "]"}]} for i in range(30)] + [123456789]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=1))
    assert list(lfdata.iter_file_records(tmp_path / "a.json")) == records
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in records[:3]))  # JSON Lines named .json
    assert list(lfdata.iter_file_records(tmp_path / "b.json")) == records[:3]


def test_given_tags_replace_defaults_key_by_key():
    attr = lfdata.parse_entry("m", MLLM_ENTRY)
    assert attr.tag("user_tag") == "user" and attr.tag("system_tag") is None  # not the default "system"
    assert attr.column("messages") == "messages" and attr.column("prompt") is None
    plain = lfdata.parse_entry("p", {"file_name": "x.json"})
    assert plain.column("prompt") == "instruction" and plain.tag("role_tag") == "from"


def test_a_leading_system_message_wins_over_the_system_column():
    attr = lfdata.parse_entry("s", {"file_name": "x.json", "formatting": "sharegpt",
                                    "columns": {"messages": "conversations", "system": "system"}})
    rec = {"system": "column", "conversations": [{"from": "system", "value": "message"},
                                                 {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    turns, _, _ = lfdata.to_turns(rec, attr)
    assert turns == [("system", "message"), ("user", "q"), ("assistant", "a")]


@pytest.mark.parametrize("name, kind", [("a.json", "json"), ("a.jsonl", "json"), ("a.txt", "text"), (".DS_Store", None)])
def test_file_types_follow_llamafactory(name, kind):
    assert lfdata.file_type(name) == kind


def test_a_fresh_mmdata_build_validates_clean(tmp_path):
    out = tmp_path / "built"
    assert main(["build", "latex_ocr_sample", "--quiet", "--num-proc", "1", "--set", f"output.dir={out}",
                 "--set", "max_samples=6", "--set", "split.val=2"]) == 0
    report = validate(out, cutoff_len=4096)
    assert report.ok and not codes(report, "warning"), report.format_text()
    assert sum(e.records for e in report.entries.values()) == 6


# ---------------------------------------------------------------------- what breaks datasets' JSON loader


def _shards(root: Path, *parts: list[dict]) -> Path:
    entry = {**MLLM_ENTRY, "file_name": "mllm"}
    info = make_dataset(root, records=parts[0], entry={**entry, "file_name": "mllm/part-00000.jsonl"})
    info.write_text(json.dumps({"mllm": entry}))
    for i, records in enumerate(parts[1:], 1):
        (root / "mllm" / f"part-{i:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return info


def test_shards_with_different_columns_are_an_error(tmp_path):
    info = _shards(tmp_path, [record()], [record("Hi", images=None)])
    problem = only(validate(info), "columns-differ")
    assert problem.file == "mllm/part-00001.jsonl" and "'images'" in problem.message and '"images": []' in problem.fix


def test_shard_whose_images_are_all_empty_is_an_error(tmp_path):
    info = _shards(tmp_path, [record()], [record("Hi", images=[])])
    problem = only(validate(info), "untyped-first-chunk")
    assert problem.file == "mllm/part-00001.jsonl" and "DatasetGenerationCastError" in problem.message


def test_declared_column_that_no_record_has_is_an_error(tmp_path):
    entry = {"file_name": "a.json", "formatting": "alpaca",
             "columns": {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}}
    info = make_dataset(tmp_path, records=[{"instruction": "q", "input": "", "output": "a"}], entry=entry)
    problem = only(validate(info), "missing-column")
    assert problem.severity == "error" and "KeyError 'history'" in problem.message


def test_png_without_iend_that_decodes_is_accepted_like_the_build_does(tmp_path):
    """PIL's verify() flags a PNG cut before IEND, but it decodes (and trains) fine: validate agrees with the build."""
    info = make_dataset(tmp_path)
    png = tmp_path / "images" / "b.png"
    png.write_bytes(png.read_bytes()[:-12])
    assert validate(info).ok, validate(info).format_text()
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])  # really truncated: the decode fails
    assert "image-unreadable" in codes(validate(info)), validate(info).format_text()


def test_missing_column_fix_does_not_suggest_a_column_already_mapped(tmp_path):
    info = make_dataset(tmp_path, records=[record(question="Hi", images=None)])
    problem = only(validate(info), "missing-column")
    assert '"images": "messages"' not in problem.fix and "remove columns.images" in problem.fix


def test_stray_file_in_a_shard_folder_is_the_one_named(tmp_path):
    info = _shards(tmp_path, [record()], [record()])
    (tmp_path / "mllm" / "notes.txt").write_text("my notes")
    problem = only(validate(info), "file-types")
    assert "offending: notes.txt" in problem.message


def test_two_records_on_one_line_load_as_datasets_loads_them(tmp_path):
    info = make_dataset(tmp_path, entry={**MLLM_ENTRY, "file_name": "mllm.jsonl"}, records=[])
    (tmp_path / "mllm.jsonl").write_text(json.dumps(record()) + json.dumps(record()) + "\n")
    report = validate(info)
    assert report.ok and report.entries["mllm"].records == 2, report.format_text()


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|video_pad|>"])
def test_the_models_own_media_token_in_text_is_an_error_and_a_build_reject(tmp_path, token):
    """A literal <|image_pad|> passed validate and build; LLaMA-Factory's tokenizer then made 65 image tokens for 64
    image features and stopped training."""
    import mmdata

    info = make_dataset(tmp_path / "v", [record(f"<image>What does {token} mean?"), record()])
    report = validate(info)
    problem = [p for p in report.errors if token in p.message]
    assert [p.record for p in problem] == [0] and "Image features and image tokens do not match" in problem[0].fix
    rows = [record(f"<image>What does {token} mean?", images=[str(tmp_path / "v" / "images" / "a.jpg")]),
            record(images=[str(tmp_path / "v" / "images" / "a.jpg")])]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(json.dumps({"name": "t", "source": {"type": "jsonl", "path": "rows.jsonl",
                                                                          "allowed_roots": [str(tmp_path)]},
                                                 "output": {"dir": str(tmp_path / "out")}}))
    result = mmdata.build(str(tmp_path / "r.yaml"), num_proc=1)
    assert result.written == 1 and result.rejected == 1
    reject = json.loads((result.output_dir / "rejects.jsonl").read_text())
    assert reject["position"] == 0 and token in reject["message"]
