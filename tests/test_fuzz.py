"""Fuzzing the readers and the validator: whatever the input, the only exceptions are mmdata's own.

Readers (CSV, JSON, JSONL, recipe YAML) may raise an :class:`MmdataError` subclass (a file-level error naming the
file) and must otherwise yield rows; the normaliser may raise only :class:`SampleError` (a reject); the sample
validator returns problems or raises pydantic's ``ValidationError`` (which the build turns into a reject); image
checks raise only :class:`SampleError`.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tests.conftest import jpeg_bytes, png_bytes

from mmdata.errors import MmdataError, RecipeError, SampleError
from mmdata.images import convert_image, inspect_image
from mmdata.normalize import normalize_row
from mmdata.recipes import load_recipe, validate_recipe
from mmdata.samples import Sample, conversation_problems
from mmdata.sources.csv import CsvParams, CsvSource
from mmdata.sources.jsonfile import JsonParams, JsonSource

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
WORK = Path(tempfile.mkdtemp(prefix="mmdata-fuzz-"))

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["<image>", "user", "assistant", "system", "human", "gpt", "a.jpg", "../x.jpg", "/etc/x"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["messages", "conversations", "role", "from", "content", "value", "images", "image", "id",
                         "instruction", "input", "output", "system", "history", "videos", "bytes", "path", "x"]),
        children, max_size=5),
    max_leaves=25,
)


def consume(rows) -> list:
    return list(itertools.islice(rows, 10_000))


@FUZZ
@given(data=st.binary(max_size=400) | st.text(max_size=400).map(str.encode), suffix=st.sampled_from([".json", ".jsonl"]))
def test_json_reader_raises_only_mmdata_errors_on_arbitrary_bytes(data, suffix):
    path = WORK / f"f{suffix}"
    path.write_bytes(data)
    try:
        consume(JsonSource(JsonParams(path=str(path)), WORK).rows())
    except MmdataError:
        pass


@FUZZ
@given(records=st.lists(JSON_VALUES, max_size=6), as_array=st.booleans())
def test_json_reader_turns_every_parsed_record_into_a_row_or_a_reject_row(records, as_array):
    if not as_array:
        records = [{"id": 0}, *records]  # a file that starts with "[" is read as one JSON array, by design
    path = WORK / ("g.json" if as_array else "g.jsonl")
    path.write_text(json.dumps(records) if as_array else "\n".join(json.dumps(r) for r in records))
    try:
        rows = consume(JsonSource(JsonParams(path=str(path)), WORK).rows())
    except MmdataError:
        return
    assert len(rows) == len(records)  # nothing silently dropped
    assert all(isinstance(r, dict) for r in rows)


@FUZZ
@given(data=st.binary(max_size=300) | st.text(alphabet=st.sampled_from(list('ab,"\n\r;\x00é\ufeff ')), max_size=200)
       .map(str.encode), encoding=st.sampled_from(["auto", "utf-8", "latin-1", "gb18030"]))
def test_csv_reader_raises_only_mmdata_errors(data, encoding):
    path = WORK / "f.csv"
    path.write_bytes(data)
    try:
        source = CsvSource(CsvParams(path=str(path), encoding=encoding), WORK)
        rows = consume(source.rows())
        assert len(rows) == source.num_rows()
    except MmdataError:
        pass


BASE_RECIPE = {"name": "f", "source": {"type": "jsonl", "path": "d.jsonl"}, "output": {"dir": "out"}}


@FUZZ
@given(text=st.text(max_size=300))
def test_recipe_loader_raises_only_recipe_errors_on_arbitrary_text(text):
    path = WORK / "r.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates: invalid UTF-8 on purpose
    try:
        load_recipe(path)
    except MmdataError:
        pass


@FUZZ
@given(extra=st.dictionaries(st.sampled_from(["name", "source", "fields", "prompt", "system", "max_samples", "images",
                                              "split", "output", "filters", "seed", "num_proc", "unknown"]),
                             JSON_VALUES, max_size=4))
def test_recipe_validation_raises_only_recipe_errors_on_arbitrary_structures(extra):
    path = WORK / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE_RECIPE, **extra}))
    try:
        load_recipe(path)
    except MmdataError:
        pass


FIELDS = st.fixed_dictionaries({}, optional={role: st.sampled_from(["messages", "images", "image", "id", "x",
                                                                    "content", "output"])
                                             for role in ("id", "image", "images", "question", "answer", "messages",
                                                          "system")})


@FUZZ
@given(row=st.dictionaries(st.sampled_from(["messages", "images", "image", "id", "x", "content", "output", "videos"]),
                           JSON_VALUES, max_size=6), fields=FIELDS,
       prompt=st.none() | st.sampled_from(["Describe.", "{x}", "{missing}", "{x.y}", "{0}", "{{literal}}", "{"]))
def test_normalize_raises_only_sample_errors_and_the_validator_only_validation_errors(row, fields, prompt):
    try:
        recipe = validate_recipe({**BASE_RECIPE, "prompt": prompt, "system": None}, base_dir=str(WORK))
    except RecipeError:
        assert prompt in ("{", "{x.y}", "{0}")  # refused with the recipe, before any row: not plain column names
        return
    full_fields = {role: fields.get(role) for role in ("id", "image", "images", "question", "answer", "messages",
                                                      "system")}
    try:
        draft = normalize_row(dict(row), 0, recipe, full_fields, WORK)
    except SampleError:
        return
    try:
        Sample.model_validate({"messages": draft.messages, "images": ["x.jpg"] * len(draft.images),
                               "videos": draft.videos})
    except ValidationError:
        pass


@FUZZ
@given(turns=st.lists(st.tuples(st.text(max_size=10) | st.sampled_from(["user", "assistant", "system"]),
                                JSON_VALUES), max_size=6),
       n_images=st.integers(0, 3), n_videos=st.integers(0, 2), allow_empty=st.booleans())
def test_conversation_rules_return_problems_and_never_raise(turns, n_images, n_videos, allow_empty):
    problems = conversation_problems(turns, n_images, n_videos, allow_empty)
    assert all(isinstance(p, str) for p in problems)


SEEDS = [jpeg_bytes(), png_bytes()]


@FUZZ
@given(seed=st.sampled_from(SEEDS), cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 2000),
                                                                                       st.integers(0, 255)), max_size=8),
       verify=st.sampled_from(["header", "decode"]))
def test_image_checks_raise_only_sample_errors_on_corrupted_bytes(seed, cut, flips, verify):
    data = bytearray(seed[:cut] if cut < len(seed) else seed)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    assume(bytes(data) != seed or not flips)
    try:
        inspect_image(bytes(data), verify)
        convert_image(bytes(data), 500, "keep", 90)
    except SampleError:
        pass
