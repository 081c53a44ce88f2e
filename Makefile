# Two entry points: `make demo` (build the offline sample) and `make test` (the test suite). Each makes its own venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,train]"

demo: install
	$(BIN)/mmdata build latex_ocr_sample --set output.dir=out/latex_ocr_sample
	$(BIN)/mmdata validate out/latex_ocr_sample/dataset_info.json
	@echo "LLaMA-Factory dataset ready: dataset_dir=out/latex_ocr_sample (see out/latex_ocr_sample/dataset_info.json)"

test: install-test
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) out build dist
