"""Hard-link this Python's torch, torchvision and their CUDA wheels into another venv's site-packages.

    python share_torch.py TARGET_SITE_PACKAGES

Run with the mmdata venv's Python (``make install-test`` put torch 2.14.1 + torchvision 0.29.1 there, the same pair
conformance/requirements.txt pins). Why: that pair is a CUDA build, about 5.5 GB, and a second copy in LLaMA-Factory's
venv has filled a CI machine's disk. Hard links cost no space, and the linked dist-info folders make pip see the pins
as already met, so it installs nothing more for them. Every file is a link to the same bytes, so nothing in the target
may be edited in place (pip only ever removes and writes whole files, as does ``run.sh``'s torchaudio step).

Console scripts (``torchrun``, outside site-packages) are not linked, so LLaMA-Factory's venv has none: it runs
LLaMA-Factory on the CPU in one process (``run.sh``), never ``FORCE_TORCHRUN``.

When a link cannot be made (another filesystem, say) it removes the links it made and exits 1: pip then installs its
own copy as before.
"""

from __future__ import annotations

import os
import re
import sys
from importlib.metadata import distributions
from pathlib import Path

SHARED = re.compile(r"torch|torchvision|triton|nvidia-.*|cuda-.*")


def _shared_files() -> list[tuple[Path, str]]:
    """(absolute source, path relative to site-packages) for every file the shared distributions' RECORDs list."""
    files = []
    for dist in distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if not SHARED.fullmatch(name):
            continue
        for record in dist.files or []:
            source = Path(dist.locate_file(record)).resolve()
            if source.is_file() and not str(record).startswith(".."):  # skip scripts in bin/
                files.append((source, str(record)))
    return files


def main(target: Path) -> int:
    made: list[Path] = []
    try:
        files = _shared_files()
        if not any(relative.startswith("torch/") for _, relative in files):
            raise OSError("this Python has no torch to share")
        for source, relative in files:
            link = target / relative
            if link.exists():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, link)
            made.append(link)
    except OSError as err:
        for link in made:
            link.unlink(missing_ok=True)
        print(f"share_torch: not shared ({err}); pip installs its own copy")
        return 1
    print(f"share_torch: {len(made)} files hard-linked into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
