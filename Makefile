# The two commands of the README: `make demo` (set up, run the default scenario) and `make test`
# (set up, run the whole suite). `make check` is the edit loop's tier (a few minutes): the floors of the
# package, the unit tests, validation and fuzzing, and one end-to-end run. Set-up pins the CPU build of
# torch through constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup sysdeps demo test check bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,lightning,torchft]'
	touch $(STAMP)

demo: setup
	$(BIN)/burnin run smoke

# System packages the tests need: Prometheus, promtool and the Pushgateway (tests/test_prometheus.py),
# Chromium (tests/test_browser.py opens the HTML reports in it, headless), and Slurm with munge
# (tests/test_fleet.py starts its own munged, slurmctld and three slurmd on this host). Debian's packages,
# installed only when missing and only as root with apt-get. Their services must not start (policy-rc.d
# says no for the install; stopped and disabled after it in case they did), so no port stays taken.
SYS_BINS := prometheus promtool prometheus-pushgateway chromium slurmctld slurmd srun munged
SYS_PKGS := prometheus prometheus-pushgateway chromium slurm-wlm munge

sysdeps:
	@missing=""; for b in $(SYS_BINS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "sysdeps:$$missing missing (needs root and apt-get to install): the tests that need them will be skipped"; exit 0; \
	fi; \
	guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	  guard=/usr/sbin/policy-rc.d; printf '#!/bin/sh\nexit 101\n' >$$guard; chmod 755 $$guard; trap 'rm -f $$guard' EXIT; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	echo "sysdeps: apt-get install $(SYS_PKGS)"; \
	{ apt-get update -qq && apt-get install -y -qq --no-install-recommends $(SYS_PKGS) >/dev/null; } \
	  || echo "sysdeps: apt-get failed: the tests that need them will be skipped"; \
	for svc in prometheus prometheus-pushgateway slurmctld slurmd munge; do \
	  if [ -d /run/systemd/system ]; then systemctl disable --now $$svc >/dev/null 2>&1 || true; \
	  elif [ -x /etc/init.d/$$svc ]; then /etc/init.d/$$svc stop >/dev/null 2>&1 || true; fi; \
	done

# Two pytest workers (xdist) on a 2-core machine: while one test waits (heartbeats, collective timeouts,
# restarts) the other computes. A module goes to one worker whole (loadscope), so a module's fixtures
# (a real run, a campaign, a Prometheus server) are built once; the workers share one golden cache.
# The heaviest modules go out first (tests/conftest.py, MODULE_SECONDS), not xdist's order by count.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test: setup sysdeps
	$(BIN)/python -m pytest -q $(XDIST)

check: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow or check" --durations=10

bench: setup
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/campaign.py

clean:
	rm -rf $(VENV) runs .pytest_cache
