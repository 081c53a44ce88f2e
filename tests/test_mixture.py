"""Mixture recipes: exact per-source counts, text-only and image samples together, seeded order, identical reruns."""

from __future__ import annotations

import json

import datasets
import pytest
from tests.conftest import jpeg_bytes, read_jsonl_dir, write_recipe

import mmdata
from mmdata.errors import RecipeError, SourceError
from mmdata.sources.mixture import counts_from_weights


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture
def parts(tmp_path, latex_hub):
    """Three components: LaTeX OCR (built-in recipe on the hub fixture), a text-only dialogue, a CSV VQA set."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    dialogue = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in range(12)]
    (data / "dialogue.jsonl").write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in dialogue) + "\n",
                                         encoding="utf-8")
    lines = ["image,question,answer"]
    for i in range(6):
        (data / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(color=(i * 40, 80, 0)))
        lines.append(f"img/{i}.jpg,How many?,{i}")
    (data / "vqa.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    components = [
        {"recipe": "latex_ocr", "count": 20, "set": {"source.path": str(latex_hub), "source.subset": "small"}},
        {"name": "dialogue", "source": {"type": "jsonl", "path": "data/dialogue.jsonl"}, "count": 10,
         "system": "你是医生。"},
        {"name": "vqa", "source": {"type": "csv", "path": "data/vqa.csv"}, "count": 5,
         "fields": {"image": "image", "question": "question", "answer": "answer"}},
    ]
    return components


def build_mixture(tmp_path, components, out="out", num_proc=1, **extra):
    recipe = {"name": "mix", "source": {"type": "mixture", "seed": 7, "components": components},
              "output": {"dir": str(tmp_path / out), "shard_size": 8}, **extra}
    return mmdata.build(str(write_recipe(tmp_path / "mix.yaml", recipe)), num_proc=num_proc)


def test_counts_per_source_match_and_samples_keep_their_own_mapping(tmp_path, parts):
    result = build_mixture(tmp_path, parts)
    assert result.counts["by_source"] == {"latex_ocr": 20, "dialogue": 10, "vqa": 5}
    assert result.counts["written"] == 35 and result.counts["rejected"] == 0
    got = read_jsonl_dir(result.datasets["mix"])
    latex = [r for r in got if "LaText OCR" in r["messages"][0]["content"]]
    dialogue = [r for r in got if r["messages"][0]["role"] == "system"]
    vqa = [r for r in got if r["messages"][0]["content"] == "<image>How many?"]
    assert (len(latex), len(dialogue), len(vqa)) == (20, 10, 5)
    assert all(not r.get("images") for r in dialogue)
    assert dialogue[0]["messages"] == [{"role": "system", "content": "你是医生。"},
                                       {"role": "user", "content": "问题0"}, {"role": "assistant", "content": "回答0"}]
    assert [r["messages"][1]["content"] for r in vqa] == ["0", "1", "2", "3", "4"]  # each component keeps its order
    assert (result.output_dir / vqa[2]["images"][0]).read_bytes() == (tmp_path / "data/img/2.jpg").read_bytes()
    kinds = ["l" if r in latex else "d" if r in dialogue else "v" for r in got]
    assert kinds[:10].count("l") < 10  # interleaved, not concatenated


def test_rerun_gives_identical_bytes_and_the_seed_decides_the_order(tmp_path, parts):
    first = build_mixture(tmp_path, parts, out="a")
    second = build_mixture(tmp_path, parts, out="b", num_proc=2)

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and ".mmdata" not in p.parts and p.name != "mmdata_build.json"}

    assert files(first.output_dir) == files(second.output_dir)
    parts_other_seed = build_mixture(tmp_path, parts, out="c", seed=1)  # the recipe seed is not the mixture seed
    assert files(parts_other_seed.output_dir) == files(first.output_dir)
    recipe = {"name": "mix", "source": {"type": "mixture", "seed": 8, "components": parts},
              "output": {"dir": str(tmp_path / "d"), "shard_size": 8}}
    reordered = mmdata.build(str(write_recipe(tmp_path / "mix8.yaml", recipe)), num_proc=1)
    assert files(reordered.output_dir) != files(first.output_dir)
    assert reordered.counts["by_source"] == first.counts["by_source"]


def test_weights_become_exact_counts_of_total(tmp_path, parts):
    for component in parts:
        component.pop("count")
    parts[0]["weight"], parts[1]["weight"], parts[2]["weight"] = 0.5, 0.3, 0.2
    recipe = {"name": "mix", "source": {"type": "mixture", "total": 19, "components": parts},
              "split": {"val": 3}, "output": {"dir": str(tmp_path / "o")}}
    result = mmdata.build(str(write_recipe(tmp_path / "w.yaml", recipe)), num_proc=1)
    assert result.counts["by_source"] == {"latex_ocr": 9, "dialogue": 6, "vqa": 4}  # 9.5, 5.7, 3.8 -> 19
    assert result.counts["by_split"] == {"train": 16, "val": 3}
    assert counts_from_weights([1, 1, 1], 10) == [4, 3, 3]


def test_a_component_smaller_than_its_count_is_an_error(tmp_path, parts):
    parts[2]["count"] = 7
    with pytest.raises(SourceError, match="mixture component 'vqa' has 6 rows but 7 were asked for"):
        build_mixture(tmp_path, parts)


def test_component_errors_become_rejects_with_their_source(tmp_path, parts):
    parts[2]["fields"]["answer"] = "missing_column"
    result = build_mixture(tmp_path, parts)
    assert result.counts["by_source"] == {"latex_ocr": 20, "dialogue": 10}
    rejects = [json.loads(line) for line in (result.output_dir / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 5 and {r["source"] for r in rejects} == {"vqa"}
    assert "missing_column" in rejects[0]["message"]


def test_invalid_components_are_reported_when_the_recipe_loads(tmp_path, parts):
    parts[1]["weight"] = 0.5
    with pytest.raises(RecipeError, match="a `count` or a `weight`, not both"):
        build_mixture(tmp_path, parts)


def test_a_mixture_that_includes_itself_is_named(tmp_path):
    """It recursed to Python's limit and was reported as "not valid YAML: RecursionError"."""
    write_recipe(tmp_path / "m9.yaml", {"name": "m9", "output": {"dir": str(tmp_path / "o")}, "source": {
        "type": "mixture", "components": [{"recipe": "m9.yaml", "count": 2}]}})
    with pytest.raises(SourceError, match=r"mixture 'm9' includes itself \(m9 -> m9\)"):
        mmdata.build(str(tmp_path / "m9.yaml"))
