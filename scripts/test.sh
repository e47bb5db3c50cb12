#!/usr/bin/env bash
# Run every test (unit, distributed on 2-3 CPU ranks, local Slurm). Extra args go to pytest.
# Skipped tests are listed with their reasons (-rs); with CI=true the Slurm and MPI tests fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$PYTHON" -m pytest -q -rs -p no:cacheprovider "$@" tests
