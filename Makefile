# The two commands of README.md. Everything they need is installed here,
# so they work on a fresh Debian machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# compat mode: the default PEP 660 editable install hides twisted/plugins
# from twistd (see ../shared/research/twisted-mail.md §5)
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q

.PHONY: run test install install-test debian-test-deps bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP_INSTALL) -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]' --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test debian-test-deps

# Debian packages the tests use (swaks as a second real SMTP client).
debian-test-deps:
	@if ! command -v swaks >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq swaks >/dev/null) \
	      || echo "warning: could not install swaks; its tests will be skipped"; \
	  else echo "note: swaks not installed; its tests will be skipped"; fi; \
	fi

# Start the server on the embedded default configuration (loopback only).
run: install
	$(BIN)/twistd -n --pidfile= exedge --config etc/exedge.toml

test: install-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/accept_rate.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
