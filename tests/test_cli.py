"""The CLI is a thin face of the API: each command on real files, and errors as one line with an exit code."""

import json

from mmdata.cli import main


def test_list_and_show(capsys):
    assert main(["list"]) == 0
    assert "latex_ocr_sample" in capsys.readouterr().out
    assert main(["show", "latex_ocr_sample"]) == 0
    shown = capsys.readouterr().out
    assert "type: synthetic_latex" in shown and "recipes/data; in a copy, write them out in full" in shown


def test_schema_commands_print_json(capsys):
    assert main(["schema", "sample"]) == 0
    assert "messages" in json.loads(capsys.readouterr().out)["properties"]
    assert main(["schema", "recipe"]) == 0
    assert "output" in json.loads(capsys.readouterr().out)["properties"]


def test_build_sample_with_overrides(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["build", "latex_ocr_sample", "--quiet", "--num-proc", "1", "--set", f"output.dir={out}",
                 "--set", "max_samples=10", "--set", "split.val=2"]) == 0
    text = capsys.readouterr().out
    assert "read 10  written 10  rejected 0" in text
    manifest = json.loads((out / "mmdata_build.json").read_text())
    assert manifest["counts"]["by_split"] == {"train": 8, "val": 2}
    assert main(["build", "latex_ocr_sample", "--quiet", "--set", f"output.dir={out}", "--set", "max_samples=10",
                 "--set", "split.val=2"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_errors_are_one_line_with_exit_code(tmp_path, capsys):
    assert main(["build", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmdata: error:") and "nope.yaml" in err
    assert main(["build", "latex_ocr_sample", "--set", "nonsense"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err


def test_set_of_a_key_build_also_takes_as_an_argument_applies_and_bad_counts_are_refused(tmp_path, capsys):
    """--set num_proc=1 was a TypeError traceback (num_proc reached build() twice); num_proc 0 passed silently."""
    import pytest

    import mmdata

    out = tmp_path / "np"
    assert main(["build", "latex_ocr_sample", "--quiet", "--set", f"output.dir={out}", "--set", "num_proc=1",
                 "--set", "max_samples=4"]) == 0
    assert "written 4" in capsys.readouterr().out
    with pytest.raises(mmdata.RecipeError, match="num_proc=0"):
        mmdata.build("latex_ocr_sample", num_proc=0, output__dir=str(tmp_path / "zero"))
