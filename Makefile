# mailworker — `make demo` shows it working, `make test` proves it.
# Both install what they need on a fresh Debian machine (python3, make, root).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get
# Debian packages the tests run for real: redis-server, postfix for its smtp-sink
# (installed unconfigured, so no MTA starts on this machine), rabbitmq-server (a
# private node per test session) and systemd (for systemd-analyze verify).
POSTFIX_PRESEED := postfix postfix/main_mailer_type select No configuration

.PHONY: test demo lint typecheck unit bench perf faults fuzz system-deps test-deps venv clean

test: venv test-deps lint typecheck unit

demo: venv
	$(BIN)/mailworker demo

system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(APT) update -qq && $(APT) install -y -qq $$missing >/dev/null; \
	fi

test-deps:
	@missing=""; \
	[ -x /usr/sbin/smtp-sink ] || missing="$$missing postfix"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	[ -x /usr/sbin/rabbitmq-server ] || missing="$$missing rabbitmq-server"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		echo "$(POSTFIX_PRESEED)" | $(SUDO) debconf-set-selections; \
		$(APT) update -qq && $(APT) install -y -qq $$missing >/dev/null; \
	fi

venv: system-deps $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,django,flask,dkim,oauth]'
	touch $(STAMP)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck:
	$(BIN)/mypy --strict mailworker tests/type_usage

unit:
	$(BIN)/pytest -n 2

bench: venv
	$(BIN)/python benchmarks/bench_smtp.py

# The comparison table (private Postfix, Redis, Celery workers, Nodemailer via npm):
# about 11 minutes; `make perf PERF_ARGS=--quick` for a smoke run, `--help` for the rest.
PERF_ARGS ?=
perf: venv test-deps
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/perf.py $(PERF_ARGS)

faults: venv test-deps
	$(BIN)/python benchmarks/faults.py

# The long run of the hostile-input tests (make test runs a few hundred examples).
fuzz: venv test-deps
	MAILWORKER_FUZZ_EXAMPLES=$${MAILWORKER_FUZZ_EXAMPLES:-10000} $(BIN)/pytest -n 2 --timeout=0 \
		--hypothesis-show-statistics tests/message/test_fuzz_payloads.py \
		tests/contrib/test_fuzz_entry_points.py tests/smtp/test_fuzz_server.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
