# Entry points: `make demo` (build the offline sample), `make test` (lint, unit tests, then the LLaMA-Factory
# conformance run). Each makes its own venv in .venv; nothing is downloaded but packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test unit conformance install install-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

# torch 2.14.1 with torchvision 0.29.1: the pair that imports together (transformers' Qwen2-VL processor needs
# torchvision); pip takes both from this machine's local wheel store. The extras bring the trainer, Ray and ModelScope.
install-test: $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev,train,ray,modelscope]"

demo: install
	$(BIN)/mmdata build latex_ocr_sample --set output.dir=out/latex_ocr_sample
	$(BIN)/mmdata validate out/latex_ocr_sample/dataset_info.json
	@echo "LLaMA-Factory dataset ready: dataset_dir=out/latex_ocr_sample (see out/latex_ocr_sample/dataset_info.json)"

test: unit conformance

# LLaMA-Factory 0.9.5's own source (the wheel, unpacked, no install): tests/test_profiles.py checks mmdata's token
# counts against its template and plugin code.
LF_SRC := .cache/lf-src
$(LF_SRC)/llamafactory:
	$(BIN)/pip download -q --no-deps -d .cache/lf-wheel llamafactory==0.9.5
	$(BIN)/python -c "import zipfile, glob; zipfile.ZipFile(glob.glob('.cache/lf-wheel/llamafactory-0.9.5-*.whl')[0]).extractall('$(LF_SRC)')"

unit: install-test $(LF_SRC)/llamafactory
	$(BIN)/ruff check src tests examples
	MMDATA_LF_SRC=$(abspath $(LF_SRC)) $(BIN)/python -m pytest -q

# What mmdata writes loads, trains, predicts and merges in the real LLaMA-Factory (its own venv in .cache/lf-venv).
conformance: install-test
	bash conformance/run.sh $(abspath $(BIN)/python)

lint: install-test
	$(BIN)/ruff check src tests examples

clean:
	rm -rf $(VENV) out build dist .cache
