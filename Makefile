# The two commands of README.md. Everything they need is installed here,
# so they work on a fresh Debian machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# compat mode: the default PEP 660 editable install hides twisted/plugins
# from twistd (see ../shared/research/twisted-mail.md §5)
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q

.PHONY: run test install install-test debian-test-deps bench fuzz clean

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

# Debian packages the tests use: swaks (a second real SMTP client; its
# STARTTLS needs libnet-ssleay-perl), ss
# (iproute2: the listen backlog the kernel holds), a
# Samba AD domain controller (the directory for AUTH; ../shared/research/
# directory-servers.md) and rspamd (the plugins/rspamd_scan.py stage; the
# tests start their own daemon), fetchmail (a site collecting in its ETRN and
# ODMR modes) and postfix (a private instance as the provider our ETRN client
# asks; the system one is never started). policy-rc.d keeps Debian from
# starting services. chromium and chromium-driver: the queue viewer page in a
# real headless browser, driven by Selenium (a browser fetched at install
# time, as Playwright does, cannot be had here).
SAMBA_PACKAGES := samba samba-dsdb-modules samba-vfs-modules samba-ad-provision
debian-test-deps:
	@missing=""; \
	command -v swaks >/dev/null 2>&1 || missing="$$missing swaks"; \
	perl -MNet::SSLeay -e1 >/dev/null 2>&1 || missing="$$missing libnet-ssleay-perl"; \
	command -v samba >/dev/null 2>&1 || missing="$$missing $(SAMBA_PACKAGES)"; \
	command -v rspamd >/dev/null 2>&1 || missing="$$missing rspamd"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v ss >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v fetchmail >/dev/null 2>&1 || missing="$$missing fetchmail"; \
	command -v postfix >/dev/null 2>&1 || missing="$$missing postfix"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "warning: could not install$$missing"; \
	  else echo "note: not installed:$$missing (their tests are skipped outside CI)"; fi; \
	fi

# Start the server on the embedded default configuration (loopback only).
run: install
	$(BIN)/twistd -n --pidfile= exedge --config etc/exedge.toml

test: install-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/accept_rate.py $(BENCH_ARGS)

# The session fuzzer's long campaign: seeded random sessions on every CPU
# for FUZZ_SECONDS (tests/fuzz_campaign.py), then the Hypothesis state
# machine of tests/test_fuzz_session.py with FUZZ_EXAMPLES examples. The last
# result is in bench/README.md ("Fuzzing").
FUZZ_SECONDS ?= 3600
FUZZ_EXAMPLES ?= 5000
fuzz: $(VENV)/.installed-test
	$(BIN)/python tests/fuzz_campaign.py --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)
	EXEDGE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:randomly tests/test_fuzz_session.py

clean:
	rm -rf $(VENV) var build *.egg-info
