"""The installed wheel, not the checkout: built-in recipes ship inside it, and third-party sources plug in."""

import subprocess
import sys
import venv
from pathlib import Path

import pytest
from tests.conftest import REPO

from mmdata.sources import get_source_class, source_types


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True)
    return next(dist.glob("mmdata-*.whl"))


def test_wheel_lists_and_builds_builtin_recipes(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    # Reuse this environment's dependencies but import mmdata only from the wheel installed into the new venv.
    venv.EnvBuilder(system_site_packages=False, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    site = next((env_dir / "lib").glob("python*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz_deps.pth").write_text("\n".join(deps) + "\n")  # appended after the wheel's own path
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([python, "-c", "import mmdata; print(mmdata.__file__)"], cwd=work, check=True,
                           capture_output=True, text=True).stdout
    assert str(site) in where
    listed = subprocess.run([env_dir / "bin" / "mmdata", "list"], cwd=work, check=True, capture_output=True, text=True)
    assert "latex_ocr_sample" in listed.stdout
    built = subprocess.run([env_dir / "bin" / "mmdata", "build", "latex_ocr_sample", "--quiet", "--set",
                            "output.dir=out"], cwd=work, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert "written 40" in built.stdout and (work / "out" / "dataset_info.json").is_file()


def test_entry_point_source_plugin(tmp_path, monkeypatch):
    """A third-party package registers ``type: shout`` through the ``mmdata.sources`` entry-point group."""
    (tmp_path / "mmdata_shout.py").write_text(
        "from mmdata.sources import Source, SourceParams\n"
        "class ShoutParams(SourceParams):\n    words: list[str]\n"
        "class ShoutSource(Source):\n    Params = ShoutParams\n"
        "    def rows(self):\n        for w in self.params.words:\n"
        "            yield {'question': w, 'answer': w.upper()}\n"
    )
    dist = tmp_path / "mmdata_shout-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmdata-shout\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mmdata.sources]\nshout = mmdata_shout:ShoutSource\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "shout" in source_types()
    assert get_source_class("shout").__name__ == "ShoutSource"

    from tests.conftest import read_jsonl_dir, write_recipe

    import mmdata

    recipe = write_recipe(tmp_path / "r.yaml", {"name": "shout", "source": {"type": "shout", "words": ["hi", "yo"]},
                                                 "fields": {"question": "question", "answer": "answer"},
                                                 "output": {"dir": str(tmp_path / "out")}})
    result = mmdata.build(str(recipe), num_proc=1)
    assert [r["messages"][1]["content"] for r in read_jsonl_dir(result.datasets["shout"])] == ["HI", "YO"]


def test_wheel_holds_every_package_and_recipe(wheel):
    """pyproject lists the packages by hand (the recipes folder is mapped in): a new subpackage must be listed too."""
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for init in (REPO / "src" / "mmdata").rglob("__init__.py"):
        assert init.relative_to(REPO / "src").as_posix() in names, f"{init.parent.name} is missing from the wheel"
    for recipe in (REPO / "recipes").glob("*.yaml"):
        assert f"mmdata/builtin_recipes/{recipe.name}" in names
    assert "mmdata/builtin_recipes/data/latex_formulas.txt" in names
