# The two commands a new user runs: `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
# Test binaries are built with test-only fault injection hooks (never in `make run`).
TEST_FEATURES ?= fault-injection

.PHONY: run test deps build check bench-cps bench-media

run: build
	./target/release/crossbar run --config config/crossbar.toml

build:
	$(CARGO) build --release

## Installs what the tests need when missing (Debian): SIPp, redis-server.
deps:
	@missing=""; \
	command -v sipp >/dev/null || missing="$$missing sip-tester"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

test: deps
	$(CARGO) test --features $(TEST_FEATURES) -- --test-threads=$${TEST_THREADS:-2}

check:
	$(CARGO) clippy --all-targets --features $(TEST_FEATURES) -- -D warnings

bench-cps: build
	bench/cps.sh

bench-media: build
	bench/media.sh
