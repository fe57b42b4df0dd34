# Set-up is two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-distributed bench bench-quick lint docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build first (a looser requirement would pull gigabytes of CUDA packages).
	# Then qkv with the extras its tests use: compare (reference models), export (ONNX Runtime,
	# CTranslate2), docs (mkdocs, for the site's browser test).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,compare,export,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qkv demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests -m "not distributed"

# torchrun with 2 CPU processes (gloo): equality with one process, checkpoints, a lost worker (~3 min)
test-distributed: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/test_distributed.py -m distributed

bench: $(STAMP)
	@for f in benchmarks/[a-z]*.py; do echo "# $$f" >&2; $(PY) $$f || exit 1; done

bench-quick: $(STAMP)
	@for f in benchmarks/[a-z]*.py; do echo "# $$f" >&2; $(PY) $$f --quick || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check qkv tests benchmarks docs

# The documentation site (mkdocs.yml): built offline into site/; any warning is an error.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) runs .pytest_cache
