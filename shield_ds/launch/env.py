"""torch.distributed environment from Slurm or Open MPI.

`torch.distributed`'s env:// initialization needs RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. The deepspeed launcher and submitit set them; a rank started directly by `srun` or
`mpirun` only has its scheduler's variables. `export_distributed_env()` fills in whichever of the
five are missing, and never overwrites one that is set:

* Open MPI (`OMPI_COMM_WORLD_RANK` present; checked first, because `mpirun` inside a Slurm job
  starts its daemons with `srun`, so Slurm's variables there describe daemons, not ranks):
  rank, local rank and size from `OMPI_COMM_WORLD_*`; rank 0's host and a free port on it are
  broadcast with mpi4py (127.0.0.1 when all ranks share one node).
* Slurm job step (`SLURM_STEP_NUM_TASKS` present, i.e. a task started by `srun`; a batch script
  itself has `SLURM_PROCID=0` and `SLURM_NTASKS=N` but is one process, so it is left alone):
  RANK=`SLURM_PROCID`, LOCAL_RANK=`SLURM_LOCALID`, WORLD_SIZE=`SLURM_STEP_NUM_TASKS`,
  MASTER_ADDR = first host of the step's node list (`scontrol show hostnames`),
  MASTER_PORT = `master_port_for_job(SLURM_JOB_ID)`, so every rank computes the same port alone.
* Anything else: nothing is set (one process, or a launcher already did it).

`python -m shield_ds.launch hostfile PATH [--slots N]` writes a DeepSpeed hostfile for the
nodes of the current Slurm job, for those who run the deepspeed launcher over ssh/pdsh instead.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Callable, Mapping, MutableMapping

from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError
from shield_ds.io import write_text

DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Ports derived from job ids stay below Linux's ephemeral range (32768+), where connect() picks
# its local ports, and above the usual service ports.
PORT_BASE = 12000
PORT_SPAN = 20000

log = get_logger("launch")

Rendezvous = Callable[[], tuple[str, int]]


def master_port_for_job(job_id: str | int) -> int:
    """The TCP port a job's ranks agree on without talking: PORT_BASE + job id mod PORT_SPAN."""
    digits = re.match(r"\d+", str(job_id))
    if digits is None:
        raise ShieldError(f"Slurm job id {job_id!r} is not a number")
    return PORT_BASE + int(digits.group()) % PORT_SPAN


def free_local_port() -> int:
    """A TCP port nothing on this machine listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _expand_range_list(body: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7'] (zero padding kept, as Slurm does)."""
    out: list[str] = []
    for part in body.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo) if lo.startswith("0") else 0
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        else:
            out.append(part)
    return out


def _split_top_level(nodelist: str) -> list[str]:
    """Split a node list at commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    return [p for p in parts if p]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list ('gpu[01-03,07],login1') into host names, in Slurm's order.

    Handles several bracket groups in one name ('rack[1-2]-n[1-2]'), expanded left to right.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        names = [""]
        for text, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            if not text and not body:
                continue
            suffixes = _expand_range_list(body) if body else [""]
            names = [name + text + suffix for name in names for suffix in suffixes]
        hosts.extend(names)
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """Host names of a Slurm node list: `scontrol show hostnames` where it exists, else expand_nodelist."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        proc = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.split()
        log.warning("scontrol show hostnames %s failed (%s); expanding it here", nodelist, proc.stderr.strip())
    return expand_nodelist(nodelist)


def mpi_rendezvous() -> tuple[str, int]:
    """(address, port) of rank 0, broadcast over MPI: rank 0 binds a free port and names its host."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ShieldError("running under mpirun but mpi4py is missing: install mpi4py, "
                          "or set MASTER_ADDR and MASTER_PORT yourself") from exc
    comm = MPI.COMM_WORLD
    hosts = comm.allgather(MPI.Get_processor_name())
    found = None
    if comm.Get_rank() == 0:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostname()
        found = (addr, port)
    return comm.bcast(found, root=0)


def distributed_env(environ: Mapping[str, str], *,
                    hostnames: Callable[[str], list[str]] = slurm_hostnames,
                    rendezvous: Rendezvous = mpi_rendezvous) -> dict[str, str]:
    """The distributed variables to add to `environ` (only the missing ones; {} when none apply).

    `hostnames` expands a Slurm node list; `rendezvous` finds rank 0's address and port under MPI.
    Pure apart from those two calls, which are only made when their answer is needed.
    """
    missing = [name for name in DIST_VARS if not environ.get(name)]
    if not missing:
        return {}
    found: dict[str, str] = {}
    if "OMPI_COMM_WORLD_RANK" in environ:
        found["RANK"] = environ["OMPI_COMM_WORLD_RANK"]
        found["LOCAL_RANK"] = environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        found["WORLD_SIZE"] = environ["OMPI_COMM_WORLD_SIZE"]
        if "MASTER_ADDR" in missing or "MASTER_PORT" in missing:
            addr, port = rendezvous()
            found["MASTER_ADDR"], found["MASTER_PORT"] = addr, str(port)
    elif "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:
        found["RANK"] = environ["SLURM_PROCID"]
        found["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
        found["WORLD_SIZE"] = environ["SLURM_STEP_NUM_TASKS"]
        if "MASTER_ADDR" in missing:
            nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise ShieldError("inside a Slurm step but SLURM_STEP_NODELIST/SLURM_JOB_NODELIST is unset: "
                                  "set MASTER_ADDR")
            found["MASTER_ADDR"] = hostnames(nodelist)[0]
        if "MASTER_PORT" in missing:
            job_id = environ.get("SLURM_JOB_ID")
            if not job_id:
                raise ShieldError("inside a Slurm step but SLURM_JOB_ID is unset: set MASTER_PORT")
            found["MASTER_PORT"] = str(master_port_for_job(job_id))
    return {name: value for name, value in found.items() if name in missing}


def export_distributed_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Fill the missing torch.distributed variables of `environ` (default os.environ); return what was set."""
    environ = os.environ if environ is None else environ
    added = distributed_env(environ)
    environ.update(added)
    if added:
        log.debug("distributed environment from the scheduler: %s", added)
    return added


def deepspeed_hostfile(hosts: list[str], slots: int) -> str:
    """DeepSpeed hostfile text: one `host slots=N` line per host."""
    if slots < 1:
        raise ShieldError(f"a hostfile needs at least one slot per host, got {slots}")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def write_hostfile(path: str | os.PathLike, hosts: list[str], slots: int) -> Path:
    """Write a DeepSpeed hostfile atomically and return its path."""
    write_text(path, deepspeed_hostfile(hosts, slots))
    return Path(path)
