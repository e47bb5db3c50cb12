#!/usr/bin/env bash
# Run every test (unit, distributed on 2-3 CPU ranks, local Slurm). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$PYTHON" -m pytest -q -p no:cacheprovider "$@" tests
