# Set-up and main jobs. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test serve clean check-official

$(VENV)/.installed: pyproject.toml requirements/torch.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: compressai imports torchvision, which must match torch exactly
	$(PIP) install -q -r requirements/torch.txt
	$(PIP) install -q -c requirements/torch.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/demo.py $(IMAGE)

test: install
	scripts/install_browser.sh  # Debian's chromium for the end-to-end tests of `osdiff serve`
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/osdiff serve

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# The port of the official OSDiff code, against a checkout of it: make check-official OFFICIAL=../OSDiff
check-official: install
	$(PIP) install -q -c requirements/torch.txt -e ".[check]"
	$(PY) scripts/check_official.py --official $(OFFICIAL)
