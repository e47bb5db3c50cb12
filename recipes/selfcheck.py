"""Check the wiring of a cluster before spending GPU hours: ranks, hosts, backend, one all-reduce.

    srun -N 2 --ntasks-per-node 8 python recipes/selfcheck.py          # or: sbatch slurm/selfcheck.sh
    mpirun -np 2 python recipes/selfcheck.py

What it checks and prints: shield_ds/launch/selfcheck.py. The tools' argparse here (shield_ds.errors.ToolParser), not
shield_ds.cli: `--help` answers before any heavy import (deepspeed, transformers).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.errors import ToolParser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(prog="python recipes/selfcheck.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write OUT/selfcheck.json (rank 0)")
    parser.add_argument("--size", type=int, default=1 << 20, help="elements in the all-reduced tensor")
    parser.add_argument("--wait-for-preemption", type=float, default=0.0, metavar="SECONDS",
                        help="run steps until a preemption signal, then exit with the requeue code "
                             "(exit 1 if none arrives within SECONDS)")
    parser.add_argument("--resume", action="store_true", help="this run is a restart (set by the launchers)")
    # The deepspeed launcher passes --local_rank (LOCAL_RANK is in the environment as well).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # after parsing: --help and usage errors answer before torch and DeepSpeed load (seconds on a login node)
    from shield_ds.launch.selfcheck import run_selfcheck

    return run_selfcheck(args)


if __name__ == "__main__":
    sys.exit(main())
