#!/usr/bin/env bash
# Set up (if needed), lint, check the layering and duplicate code, and run the whole test suite on CPU.
# Tests run in parallel (pytest-xdist, one file per worker so module fixtures are built once; in the
# order tests/conftest.py gives, the slowest files first, not xdist's reordering by test count);
# MOEHARDEN_TEST_WORKERS=0 runs them in one process, and extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/lint-imports                                       # the layers contract in pyproject.toml
.venv/bin/pylint --disable=all --enable=duplicate-code src/  # one copy of each helper
exec .venv/bin/python -m pytest -n "${MOEHARDEN_TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder "$@"
