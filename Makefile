# The two commands a new user runs: `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
# Test binaries are built with test-only fault injection hooks (never in `make run`).
TEST_FEATURES ?= fault-injection

.PHONY: run test deps build check bench-cps bench-media bench-webrtc bench-icount web

run: build web
	./target/release/crossbar run --config config/crossbar.toml

build:
	$(CARGO) build --release

## The softphone page (web/dist): JsSIP from npm bundled with esbuild.
web: web/node_modules/.package-lock.json
	cd web && node build.mjs

web/node_modules/.package-lock.json: web/package-lock.json web/package.json
	@command -v npm >/dev/null || { \
	  echo "installing: nodejs npm (to build the softphone page)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm; }
	cd web && npm ci --no-audit --no-fund

## Installs what the tests need when missing (Debian): SIPp, redis-server, Chromium,
## Node.js/npm, and the web/ packages (npm ci: JsSIP, esbuild, playwright-core).
deps:
	@missing=""; \
	command -v sipp >/dev/null || missing="$$missing sip-tester"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@$(MAKE) --no-print-directory web/node_modules/.package-lock.json

test: deps web
	$(CARGO) test --features $(TEST_FEATURES) -- --test-threads=$${TEST_THREADS:-2}

check:
	$(CARGO) clippy --all-targets --features $(TEST_FEATURES) -- -D warnings

bench-cps: build
	bench/cps.sh

bench-media: build
	bench/media.sh

bench-webrtc: build
	bench/webrtc.sh

bench-icount: build
	bench/icount.sh
