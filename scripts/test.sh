#!/usr/bin/env bash
# Run every test (unit, distributed on 2-3 CPU ranks, local Slurm). Extra args go to pytest.
# Skipped tests are listed with their reasons (-rs); with CI=true the Slurm and MPI tests fail instead of skipping.
# Two pytest-xdist workers, one test file each at a time (module fixtures are built once): a 2-rank launch
# keeps 2 cores only ~70% busy (its launcher stages are single-threaded), so two files at once take ~1.5x
# less wall time here. TEST_WORKERS=0 runs everything in this process, in order.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
WORKERS=${TEST_WORKERS:-2}
PARALLEL=()
[ "$WORKERS" != 0 ] && PARALLEL=(-n "$WORKERS" --dist loadfile)
exec "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${PARALLEL[@]}" "$@" tests
