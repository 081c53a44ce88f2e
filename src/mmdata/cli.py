"""The ``mmdata`` command: parses arguments, calls the public API, prints. No logic lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from ._version import __version__
from .cliargs import positive_int
from .errors import BuildError, BuildWarning, MmdataError


def _parse_set(values: list[str]) -> dict[str, str]:
    overrides = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MmdataError(f"--set {item!r}: expected KEY=VALUE, e.g. --set output.dir=out/x")
        overrides[key.strip()] = value
    return overrides


def _count_or_share(text: str) -> int | float:
    from .recipes import count_or_share_text

    value = count_or_share_text(text)
    if isinstance(value, str):
        raise argparse.ArgumentTypeError(f"--max-rejected {text!r}: a count (10) or a share (0.05)")
    return value


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(p) for p in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    return index, count


def cmd_list(args: argparse.Namespace) -> int:
    from .recipes import recipe_catalog

    rows = [(e["name"], e["info"].get("hub_id") or e["info"].get("modelscope_id") or "-",
             e["info"].get("license") or "-", e["info"].get("size") or "-", e["description"])
            for e in recipe_catalog()]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(4)]
    for row in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False)) + "  " + row[4])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .recipes import builtin_recipe_dir, recipe_path

    path = recipe_path(args.recipe)
    if path.parent.resolve() == builtin_recipe_dir().resolve():
        # a copy of it lives elsewhere: its relative data paths would no longer resolve
        print(f"# built-in recipe {path.name}: relative local paths in it resolve against "
              f"{(builtin_recipe_dir() / 'data').resolve()}; in a copy, write them out in full")
    print(path.read_text(encoding="utf-8"), end="")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from . import build
    from .recipes import load_recipe
    from .summary import format_summary

    overrides = _parse_set(args.set)
    if args.overwrite:
        overrides["output.overwrite"] = "true"
    if args.allow_existing:
        overrides["output.allow_existing"] = "true"
    if args.max_rejected is not None:
        overrides["max_rejected"] = args.max_rejected
    # the recipe is loaded here, not by build(): a --set of a recipe key that is also one of build()'s own
    # arguments (num_proc) would otherwise reach it twice
    recipe = load_recipe(args.recipe, overrides, from_text=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BuildWarning)  # printed below, once, in the summary's words
        result = build(recipe, num_proc=args.num_proc, shard=args.shard, engine=args.engine, strict=args.strict,
                       quiet=args.quiet, rebuild=args.rebuild)
    print(format_summary(result))
    for message in result.warnings:
        print(f"mmdata: warning: {message}", file=sys.stderr)
    if result.problem:
        print(f"mmdata: error: {result.problem}", file=sys.stderr)
        return BuildError.exit_code
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .finalize import merge_shards
    from .summary import format_summary

    print(format_summary(merge_shards(args.output_dir, args.parts, strict=args.strict)))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .recipes import recipe_json_schema
    from .samples import sample_json_schema

    schema = sample_json_schema() if args.what == "sample" else recipe_json_schema()
    print(json.dumps(schema, indent=2, ensure_ascii=False))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdata", description="Multimodal datasets -> LLaMA-Factory fine-tuning data")
    parser.add_argument("--version", action="version", version=f"mmdata {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list built-in recipes")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="print a recipe")
    p.add_argument("recipe", help="built-in recipe name or path")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("build", help="build a recipe into LLaMA-Factory data")
    p.add_argument("recipe", help="built-in recipe name or path to a recipe YAML")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--num-proc", type=positive_int, default=None, help="worker processes (default: recipe or all cores)")
    p.add_argument("--shard", type=_parse_shard, default=(0, 1), metavar="I/N", help="build only part I of N")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--strict", action="store_true", help="fail the build if any record is rejected")
    p.add_argument("--overwrite", action="store_true", help="replace existing dataset_info entries / output")
    p.add_argument("--allow-existing", action="store_true", help="write into a folder that holds other files (never "
                   "deleting or replacing them); same as output.allow_existing: true")
    p.add_argument("--max-rejected", type=_count_or_share, default=None, metavar="N|SHARE",
                   help="fail (register nothing) when more rows are rejected: a count (10) or a share (0.05)")
    p.add_argument("--rebuild", action="store_true", help="redo every record even if up to date (e.g. after editing "
                   "image files in place: the fingerprint covers the recipe and data files, not every image)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("merge", help="merge --shard outputs into one dataset")
    p.add_argument("output_dir")
    p.add_argument("parts", nargs="*", help="shard output folders (none: shards were built into OUTPUT_DIR)")
    p.add_argument("--strict", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("schema", help="print the JSON Schema of a sample or a recipe")
    p.add_argument("what", choices=["sample", "recipe"])
    p.set_defaults(func=cmd_schema)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands that live next to their implementation; each registers its own arguments."""
    for module, function in (("mmdata.check", "add_validate_command"), ("mmdata.lfconfig", "add_llamafactory_command"), ("mmdata.report", "add_report_command"), ("mmdata.leakage", "add_check_leakage_command"),
                             ("mmdata.train.cli", "add_train_commands")):
        try:
            mod = __import__(module, fromlist=[function])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("mmdata"):
                continue
            raise
        getattr(mod, function)(sub)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except MmdataError as e:
        print(f"mmdata: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mmdata: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mmdata ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
