# The two commands of the README, and the benchmarks. Everything installs what it needs first.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: deps build demo demo-debian lint test test-net bench-deploy bench-vm bench-images bench-placement bench-sim bench-net bench-migrate bench-ha openapi clean

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release -p shoal

## make demo: build, start `shoal up` with three QEMU hosts, deploy a virtual cluster of real VMs,
## print it, keep running until Ctrl-C. `make demo DEMO_FLAGS=--exit` tears down and exits.
demo: build
	scripts/demo.sh target/release/shoal $(DEMO_FLAGS)

## make demo-debian: a 2-VM cluster of real Debian (`shoal template build-debian`, debootstrap from
## this machine's mirror, cached), each ready once its cloud-init succeeded, then an SSH login into
## one guest (root: the host runs in a network namespace of its own). DEMO_FLAGS=--exit as above.
demo-debian: build
	scripts/demo-debian.sh target/release/shoal $(DEMO_FLAGS)

## make lint: formatting (rustfmt.toml) and clippy with every warning an error. Part of make test.
lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## make test: lints, then the whole suite (unit, integration, end-to-end against real processes).
test: deps lint
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

## make test-net: only the cross-host virtual network tests (root: network namespaces, bridges,
## VXLAN, real guests under TCG). They remove every namespace, bridge and tap they make.
test-net: deps
	$(CARGO) test -p shoal --test net -- --test-threads=1

## Rewrites docs/openapi.json from the code (the test fails when they differ).
openapi:
	UPDATE_OPENAPI=1 $(CARGO) test -p shoal-controller --test openapi

bench-deploy: deps
	$(CARGO) build --release -p shoal -p shoal-bench
	target/release/bench-deploy target/release/shoal

bench-vm: deps
	$(CARGO) build --release -p shoal -p shoal-bench
	target/release/bench-vm target/release/shoal

## make bench-net: network set-up/tear-down on a host, and guest RTT and TCP throughput across
## hosts over VXLAN vs on one bridge (root; real guests under TCG; about 2 minutes).
bench-net: deps
	$(CARGO) build --release -p shoal -p shoal-bench
	target/release/bench-net target/release/shoal $(BENCH_FLAGS)

## make bench-migrate: moving a running 128 MiB guest between two QEMU hosts of `shoal up`, idle and
## busy, pause and live, next to the same migration driven by a bare QMP script
## (scripts/migration/bare-migrate.py); busy guests back and forth in auto mode (corrupted ones
## counted); a drain of four guests. Real guests under TCG; about 5 minutes.
bench-migrate: deps
	$(CARGO) build --release -p shoal -p shoal-bench
	target/release/bench-migrate target/release/shoal $(BENCH_FLAGS)

## make bench-ha: host failure repaired, split into detection, fencing and restart: 100 simulated
## hosts with 1,000 VMs in process (power-off and lease fencing, three hosts killed each) and three
## QEMU hosts of real demo guests under TCG; then a 1 GiB disk's checkpoint cost with 1 %, 10 % and
## 50 % of its blocks changed next to `qemu-img convert` and a full copy (root; about 5 minutes).
bench-ha: deps
	$(CARGO) build --release -p shoal -p shoal-bench
	target/release/bench-ha target/release/shoal $(BENCH_FLAGS)

## make bench-images: Shoal's image store against borg, casync and restic on the VM image corpus
## (seven 2 GiB Debian images). The corpus is built first when absent (root, about 11 minutes, about
## 15 GB under /var/tmp/shoal-corpus). BENCH_FLAGS="--only shoal" for a quick run.
SHOAL_CORPUS ?= /var/tmp/shoal-corpus/corpus
bench-images: deps
	@if [ ! -f "$(SHOAL_CORPUS)/manifests/sizes.tsv" ] && [ "$(notdir $(SHOAL_CORPUS))" = corpus ]; then \
		echo "bench-images: no corpus at $(SHOAL_CORPUS); building it with ../shared/bench/make-corpus.sh"; \
		D="$(patsubst %/corpus,%,$(SHOAL_CORPUS))" bash ../shared/bench/make-corpus.sh; \
	fi
	$(CARGO) build --release -p shoal-bench
	target/release/bench-images --corpus "$(SHOAL_CORPUS)" $(BENCH_FLAGS)

## Placement throughput and packing quality at 10,000 hosts, and rebalancing side by side with
## Ganeti's hbal (installed if missing) on the states of ../shared/bench/hbal/gen.py.
bench-placement: deps
	$(CARGO) build --release -p shoal-bench --bin bench-placement
	target/release/bench-placement

## make bench-sim: the PlanetLab day (../shared/bench/planetlab) through every baseline and Shoal's
## policy, against the reference figures and the targets. BENCH_FLAGS="--full-day" keeps every VM
## all day; "--plot sim.svg" draws the day.
bench-sim:
	$(CARGO) build --release -p shoal-sim --bin bench-sim
	target/release/bench-sim $(BENCH_FLAGS)

clean:
	$(CARGO) clean
