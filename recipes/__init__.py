"""The built-in recipes. This folder ships inside the wheel as the data-only package ``mmdata.builtin_recipes``
(mapped in pyproject.toml), so ``mmdata.build("latex_ocr")`` reads these very files."""
