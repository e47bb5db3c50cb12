"""`python -m shield_ds.launch hostfile PATH [--slots N]` (a DeepSpeed hostfile for this Slurm job's nodes) and
`python -m shield_ds.launch show` (the torch.distributed variables this process would get)."""

from __future__ import annotations

import os

from shield_ds.errors import ShieldError
from shield_ds.launch.env import DIST_VARS, distributed_env, slurm_hostnames, write_hostfile
from shield_ds.process_group import ToolParser, exit_on_error


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="python -m shield_ds.launch",
                          description="Slurm/MPI environment helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    hostfile = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for this Slurm job's nodes")
    hostfile.add_argument("path")
    hostfile.add_argument("--slots", type=int, default=None,
                          help="ranks per host (default: SLURM_NTASKS_PER_NODE, else 8)")
    sub.add_parser("show", help="print the distributed variables this process would get")
    args = parser.parse_args(argv)
    if args.command == "hostfile":
        nodelist = os.environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ShieldError("SLURM_JOB_NODELIST is unset: run this inside a Slurm job")
        slots = args.slots or int(os.environ.get("SLURM_NTASKS_PER_NODE", "8").split("(")[0])
        print(write_hostfile(args.path, slurm_hostnames(nodelist), slots))
    else:
        current = {name: os.environ[name] for name in DIST_VARS if name in os.environ}
        current.update(distributed_env(os.environ))
        for name in DIST_VARS:
            print(f"{name}={current.get(name, '')}")


if __name__ == "__main__":
    main()
