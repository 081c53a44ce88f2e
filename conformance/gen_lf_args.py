"""Regenerate ``src/mmdata/llamafactory_args.json``: the argument names the pinned LLaMA-Factory accepts.

Run with the conformance venv's Python (LLaMA-Factory installed)::

    .cache/lf-venv/bin/python conformance/gen_lf_args.py src/mmdata/llamafactory_args.json

The names come from the same HfArgumentParser dataclasses LLaMA-Factory parses a YAML with (``hparams/parser.py``):
``train`` for ``llamafactory-cli train`` (training, evaluation and ``do_predict``), ``export`` for
``llamafactory-cli export`` (and ``chat``/``api``: the inference arguments). Unknown keys are a hard error there
unless ``ALLOW_EXTRA_ARGS=1``, so mmdata checks generated YAMLs against this frozen copy.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib.metadata import version
from pathlib import Path

from llamafactory.hparams import parser as lf_parser


def argument_names(classes) -> list[str]:
    return sorted({f.name for cls in classes for f in dataclasses.fields(cls) if f.init})


def main(out: str) -> None:
    data = {
        "llamafactory_version": version("llamafactory"),
        "transformers_version": version("transformers"),
        "generated_by": "conformance/gen_lf_args.py",
        "train": argument_names(lf_parser._TRAIN_ARGS),
        "export": argument_names(lf_parser._INFER_ARGS),
    }
    Path(out).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"{out}: train {len(data['train'])} names, export {len(data['export'])} names "
          f"(llamafactory {data['llamafactory_version']}, transformers {data['transformers_version']})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1] / "src/mmdata/llamafactory_args.json"))
