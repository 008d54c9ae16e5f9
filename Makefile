# Set-up and main jobs. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOG := $(VENV)/install.log

.PHONY: install demo test serve clean check-official

# One line of output; pip's messages go to $(LOG), printed only if a step fails.
# torch first, pinned: compressai imports torchvision, which must match torch exactly.
# Then the metrics' ImageNet backbones (requirements/backbones.txt), without their dependencies.
# setuptools >= 77 reads pyproject.toml's SPDX licence form (and builds the wheel in the tests).
$(VENV)/.installed: pyproject.toml requirements/torch.txt requirements/backbones.txt
	@echo "installing into $(VENV) (log: $(LOG))"
	@mkdir -p $(VENV) && $(PYTHON) -m venv $(VENV) >$(LOG) 2>&1 \
	  && $(PIP) install -q --upgrade pip "setuptools>=77" >>$(LOG) 2>&1 \
	  && $(PIP) install -q -r requirements/torch.txt >>$(LOG) 2>&1 \
	  && $(PIP) install -q -c requirements/torch.txt -e ".[test]" >>$(LOG) 2>&1 \
	  && $(PIP) install -q --no-deps -r requirements/backbones.txt >>$(LOG) 2>&1 \
	  || { cat $(LOG) >&2; echo "make install: failed (log: $(LOG))" >&2; exit 1; }
	@touch $@

install: $(VENV)/.installed

demo: install
	@$(PY) scripts/demo.py $(IMAGE)

# installs Debian's chromium for the end-to-end tests of `osdiff serve`
test: install
	scripts/install_browser.sh
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/osdiff serve

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# The port of the official OSDiff code, against a checkout of it: make check-official OFFICIAL=../OSDiff
check-official: install
	$(PIP) install -q -c requirements/torch.txt -e ".[check]"
	$(PY) scripts/check_official.py --official $(OFFICIAL)
