"""mkdocs hook: serve the repository's committed figures (figures/*.png) and example notebooks
(examples/*.ipynb) from the site, under figures/ and examples/, without copying them into docs/."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[3]
SERVED = {"figures": "*.png", "examples": "*.ipynb"}


def on_files(files, config):
    for folder, pattern in SERVED.items():
        for path in sorted((ROOT / folder).glob(pattern)):
            if path.stem.endswith("_quick"):  # --quick outputs are not committed
                continue
            files.append(File.generated(config, f"{folder}/{path.name}", abs_src_path=str(path)))
    return files
