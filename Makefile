# The README's two commands: `make demo` and `make test`. Each creates or updates the
# virtualenv in .venv and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test venv clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

venv: $(INSTALLED)

demo: $(INSTALLED)
	$(PY) jobs/demo.py --workdir demo-lake

test: $(INSTALLED)
	$(PY) -m pytest

clean:
	rm -rf demo-lake .pytest_cache
