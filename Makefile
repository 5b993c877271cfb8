# Two commands: `make demo` (the closed loop in MuJoCo) and `make test` (pytest + ruff).
VENV ?= .venv
PY := $(VENV)/bin/python
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= $(MUJOCO_GL)
export FASTDDS_BUILTIN_TRANSPORTS ?= LARGE_DATA
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export RMW_IMPLEMENTATION ?= rmw_fastrtps_cpp

.PHONY: setup aux-venvs demo test lint colcon-check bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m magma_ros.demo $(DEMO_ARGS)

test: setup aux-venvs
	$(PY) -m ruff check magma_ros test benchmarks
	$(PY) -m pytest -q $(PYTEST_ARGS) || { echo "[test] rerunning the failed tests once: the system tests run real processes on the" \
	  "machine's cores and some are timing-sensitive under load; a real failure fails again"; \
	  $(PY) -m pytest -q --last-failed --last-failed-no-failures none $(PYTEST_ARGS); }

aux-venvs:
	@for f in test/aux_venvs/*.txt; do [ -e "$$f" ] || continue; bash scripts/aux_venv.sh $$(basename $$f .txt) >/dev/null; done

lint: setup
	$(PY) -m ruff check magma_ros test benchmarks

bench: setup
	$(PY) benchmarks/safety.py
	$(PY) benchmarks/policy_step.py --device cpu --checkpoint tiny
	$(PY) benchmarks/pipeline.py

clean:
	rm -rf build install log *.egg-info .pytest_cache
