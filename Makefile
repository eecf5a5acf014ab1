# The two commands of the README: `make demo` (run the notebook sequence into reports/) and
# `make test` (unit tests and the notebooks in smoke mode). `make lab` opens the notebooks.
PY := .venv/bin/python

.PHONY: setup demo prefetch lab test test-fast clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/run_notebooks.py --out reports

# Before a workshop: run the sequence once at default settings, so every trained model, learned curve
# and notebook 3/6 merge result is in the cache ($$CCATOOLKIT_CACHE, default ~/.cache/ccatoolkit) and
# `make demo` is fast.
prefetch: setup
	$(PY) scripts/run_notebooks.py --out reports/prefetch --no-html

lab: setup
	.venv/bin/jupyter lab notebooks/

test: setup
	CCATOOLKIT_SMOKE=1 MPLBACKEND=Agg $(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider $(PYTEST_ARGS)

test-fast: setup
	MPLBACKEND=Agg $(PY) -m pytest tests -m "not slow and not browser" $(PYTEST_ARGS)

clean:
	rm -rf reports .pytest_cache
