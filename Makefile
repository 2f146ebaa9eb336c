# Two commands matter to a newcomer: `make book` and `make test` (see README.md).
# Both create .venv on first use and install the pinned environment into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: book test execute gpu-check robust clean check-notebooks

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[book,test,lm]"
	touch $(STAMP)

## book: build the HTML into _build/html from the stored notebook outputs, warnings as errors.
book: $(STAMP)
	rm -rf _build/html _build/.doctrees
	$(VENV)/bin/jupyter-book build . --path-output . -W --keep-going
	@echo "book: open _build/html/index.html"

## test: unit tests, nbval over every chapter notebook, and the notebook consistency checks
## (progress bars off, as when the stored outputs were executed).
test: $(STAMP)
	$(PY) tools/notebooks.py check
	TQDM_DISABLE=1 $(PY) -m pytest --nbval --nbval-current-env -q

## execute: re-run every chapter (md -> ipynb) deterministically and store the outputs; each
## chapter's cell count and wall time go to book/execution_stats.csv (the book's statistics page).
execute: $(STAMP)
	$(PY) tools/notebooks.py execute

## gpu-check: on a machine with CUDA, execute every chapter there into a scratch folder, compare
## each cell's text outputs with the stored CPU outputs, and run bench/ with its GPU lines;
## exits 1 on any difference. Without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py

clean:
	rm -rf _build $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

## robust: re-execute every chapter under perturbed numerical environments (one thread, torch's
## unvectorised kernels, MKL limited to AVX2, data perturbed by 1e-12) and compare each cell's
## text outputs with the stored ones; exits 1 on any difference (tools/robust.py).
robust: $(STAMP)
	$(PY) tools/robust.py
