# agentcg: top-level entry points. `make help` lists them.
.PHONY: help setup test test-fast bpf run demo bench clean

help:
	@echo "make setup      install system packages, .venv and build the BPF objects"
	@echo "make test       setup + the whole suite (native tiers, then the kernel lab tier)"
	@echo "make test-fast  unit + fakefs tests only (seconds, no root)"
	@echo "make run        setup + start agentcgd (or, on hosts without cgroup v2, a demo in the kernel lab)"
	@echo "make bench      run the benchmarks that this host can run; results in bench/results/"

setup:
	scripts/setup.sh

test:
	scripts/test.sh

test-fast:
	.venv/bin/python -m pytest -q tests/unit tests/fakefs

bpf:
	$(MAKE) -C bpf

run:
	scripts/run.sh

clean:
	rm -rf bpf/.output .pytest_cache agentcg/client/_spawn.so
