# The README's two commands: `make demo` and `make test`. Each creates or updates the
# virtualenv in .venv and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test venv browser clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

venv: $(INSTALLED)

demo: $(INSTALLED)
	$(PY) jobs/demo.py --workdir demo-lake

test: $(INSTALLED) browser
	$(PY) -m pytest

# the report's test opens it in Debian's chromium (installed here: the test setup runs as root)
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

clean:
	rm -rf demo-lake .pytest_cache
