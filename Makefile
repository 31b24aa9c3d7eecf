# chanprune developer entry points. `make demo` and `make test` work on a fresh clone with only
# python3 (>= 3.10) installed: they create .venv and install the project into it first.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
# Re-install only when the dependency declarations change (the install is editable, so code
# changes need no re-install).
STAMP  := $(VENV)/.chanprune-installed
# -qq: some pip setups warn once per index folder they cannot find, which buries real output;
# errors still show.
PIP_FLAGS := -qq --progress-bar off --disable-pip-version-check

.PHONY: demo test test-slow lint install clean-venv

demo: $(STAMP)
	$(VPY) -m chanprune_cli.demo

# The lint first: it takes a second, the tests minutes. Tests marked `slow` are deselected
# (pyproject.toml's addopts); `make test-slow` runs them.
test: lint
	$(VPY) -m pytest -q

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow

lint: $(STAMP)
	$(VPY) -m ruff check

install: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# constraints.txt pins torch/torchvision to the versions of the local wheel mirror (no large downloads).
$(STAMP): pyproject.toml constraints.txt | $(VPY)
	@echo "installing chanprune and its dev dependencies into $(VENV) (only when pyproject.toml or constraints.txt change)"
	$(VPY) -m pip install $(PIP_FLAGS) -c constraints.txt -e '.[dev]'
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
