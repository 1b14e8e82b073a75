#!/usr/bin/env python3
"""Turn Slurm's environment into the torch.distributed rendezvous environment.

Standard library only (no megafire, no torch): usable from any launch script, before any
virtual environment is activated.

Two launch modes:

* ``task``: srun starts one task per training process (``srun --ntasks-per-node=G``). srun
  does not set RANK / WORLD_SIZE, so they are derived from SLURM_PROCID / SLURM_NTASKS /
  SLURM_LOCALID / SLURM_NODEID.
* ``node``: srun starts one launcher per node (``srun --ntasks-per-node=1 torchrun ...`` or the
  deepspeed launcher), which spawns ``nproc_per_node`` processes itself. The launcher needs
  nnodes / node_rank / nproc_per_node / master address and port.

Without Slurm (no SLURM_JOB_ID) both modes describe a single node on 127.0.0.1.

Command line (prints shell ``export`` lines, or JSON)::

    eval "$(python3 launch/slurm_env.py --mode task)"
    python3 launch/slurm_env.py --mode node --nproc-per-node 8 --format json
    python3 launch/slurm_env.py --expand 'node[01-03,07]'
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Mapping

DEFAULT_PORT = 29500
PORT_BASE = 15000   # derived ports lie in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's
PORT_SPAN = 15000   # ephemeral range (32768+), so they do not collide with outgoing sockets

__all__ = [
    "DistEnv", "expand_hostlist", "parse_tasks_per_node", "gpus_from_env", "master_port_for_job",
    "hostnames", "from_env", "in_slurm",
]


# ------------------------------------------------------------------------------------------
# hostlists
def _split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {s!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {s!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, whole: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as Slurm does)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in hostlist {whole!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        a, b = int(lo), int(hi)
        if b < a:
            raise ValueError(f"descending range {item!r} in hostlist {whole!r}")
        out.extend(str(i).zfill(width) if width else str(i) for i in range(a, b + 1))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist expression, in order, duplicates kept.

    'node[01-03,07]' -> node01 node02 node03 node07; 'a,b[1-2]' -> a b1 b2;
    'r[1-2]-n[1-2]' -> r1-n1 r1-n2 r2-n1 r2-n2 (several bracket groups: cartesian product,
    the rightmost varying fastest, as ``scontrol show hostnames``).
    """
    hosts: list[str] = []
    for elem in _split_top_level(hostlist.strip()):
        pieces = re.split(r"(\[[^\]]*\])", elem)
        combos = [""]
        for piece in pieces:
            if piece.startswith("["):
                options = _expand_range(piece[1:-1], hostlist)
            elif "[" in piece or "]" in piece:
                raise ValueError(f"unbalanced brackets in hostlist {hostlist!r}")
            else:
                options = [piece]
            combos = [c + o for c in combos for o in options]
        hosts.extend(combos)
    return hosts


def hostnames(hostlist: str, use_scontrol: bool = True) -> list[str]:
    """Hostnames of a hostlist: ``scontrol show hostnames`` when available, else our parser."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", hostlist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(hostlist)


# ------------------------------------------------------------------------------------------
# counts
def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE / SLURM_JOB_CPUS_PER_NODE form: '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not m:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _count_gres(spec: str) -> int | None:
    """'4', 'gpu:4', 'a100:4', 'gpu:a100:4', 'gpu:a100:2,gpu:v100:2' -> 4 (None if unknown)."""
    total, found = 0, False
    for item in _split_top_level(spec):
        last = item.split(":")[-1]
        last = last.split("(")[0]          # 'gpu:a100:4(IDX:0-3)'
        if last.isdigit():
            total += int(last)
            found = True
    return total if found else None


def gpus_from_env(env: Mapping[str, str]) -> int | None:
    """GPUs on this node as Slurm (or CUDA) describes them, or None."""
    v = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if v.isdigit():
        return int(v)
    for key in ("SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS_PER_NODE"):
        if env.get(key):
            n = _count_gres(env[key])
            if n is not None:
                return n
    vis = env.get("CUDA_VISIBLE_DEVICES", env.get("SLURM_STEP_GPUS", env.get("SLURM_JOB_GPUS")))
    if vis is not None and vis.strip() and vis.strip() != "NoDevFiles":
        return len([d for d in vis.split(",") if d.strip()])
    return None


def master_port_for_job(job_id: str | int | None) -> int:
    """A port that is the same on every node of a job and usually different between jobs."""
    if job_id is None or str(job_id).strip() == "":
        return DEFAULT_PORT
    digits = re.sub(r"\D", "", str(job_id))
    return PORT_BASE + int(digits or 0) % PORT_SPAN


# ------------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    """Everything a launcher or a process needs for torch.distributed's env:// rendezvous."""
    master_addr: str
    master_port: int
    nnodes: int
    node_rank: int
    nproc_per_node: int          # processes on this node (torchrun's --nproc-per-node)
    world_size: int
    rank: int | None             # task mode: this process's global rank; node mode: None
    local_rank: int | None
    in_slurm: bool
    job_id: str | None = None
    hosts: tuple[str, ...] = ()

    def exports(self, mode: str) -> dict[str, str]:
        """Environment variables to export (task mode: per-process rank variables too)."""
        e = {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "NNODES": str(self.nnodes),
            "NODE_RANK": str(self.node_rank),
            "NPROC_PER_NODE": str(self.nproc_per_node),
        }
        if mode == "task":
            e.update({
                "WORLD_SIZE": str(self.world_size),
                "RANK": str(self.rank),
                "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.nproc_per_node),
                "GROUP_RANK": str(self.node_rank),
            })
        return e


def in_slurm(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))


def _int(env: Mapping[str, str], *keys: str, default: int | None = None) -> int | None:
    for k in keys:
        v = env.get(k, "").strip()
        if v:
            try:
                return int(v)
            except ValueError:
                raise ValueError(f"{k}={v!r} is not an integer") from None
    return default


def from_env(env: Mapping[str, str] | None = None, mode: str = "task",
             nproc_per_node: int | None = None, use_scontrol: bool = True) -> DistEnv:
    """Describe the distributed layout from Slurm's variables (or a plain single node).

    Explicit MASTER_ADDR / MASTER_PORT in the environment win over derived values, so that a
    user (or an outer launcher) can always override them.
    """
    if mode not in ("task", "node"):
        raise ValueError(f"mode must be 'task' or 'node', not {mode!r}")
    env = os.environ if env is None else env

    if not in_slurm(env):
        if mode == "task":
            world = _int(env, "WORLD_SIZE", default=1)
            rank = _int(env, "RANK", default=0)
            local = _int(env, "LOCAL_RANK", default=rank)
            nproc = _int(env, "LOCAL_WORLD_SIZE", default=world)
        else:
            nproc = nproc_per_node or _int(env, "NPROC_PER_NODE") or gpus_from_env(env) or 1
            world, rank, local = nproc, None, None
        return DistEnv(
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", default=DEFAULT_PORT),
            nnodes=1, node_rank=0, nproc_per_node=nproc, world_size=world,
            rank=rank, local_rank=local, in_slurm=False)

    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                or env.get("SLURM_NODELIST") or "")
    hosts = hostnames(nodelist, use_scontrol=use_scontrol) if nodelist else []
    nnodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES",
                  default=len(hosts) or 1)
    node_rank = _int(env, "SLURM_NODEID", default=0)
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"SLURM_NODEID={node_rank} outside [0, {nnodes})")
    master_addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
    master_port = _int(env, "MASTER_PORT", default=None) or master_port_for_job(job_id)

    if mode == "task":
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
        rank = _int(env, "SLURM_PROCID")
        local = _int(env, "SLURM_LOCALID")
        if world is None or rank is None or local is None:
            raise ValueError("task mode needs SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID "
                             "(run it inside srun, one task per process)")
        per_node = None
        tpn = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        if tpn:
            counts = parse_tasks_per_node(tpn)
            if node_rank < len(counts):
                per_node = counts[node_rank]
        if per_node is None:
            per_node = _int(env, "SLURM_NTASKS_PER_NODE", default=max(1, world // nnodes))
        if not 0 <= rank < world:
            raise ValueError(f"SLURM_PROCID={rank} outside [0, {world})")
        return DistEnv(master_addr, master_port, nnodes, node_rank, per_node, world, rank,
                       local, True, job_id, tuple(hosts))

    nproc = (nproc_per_node or _int(env, "NPROC_PER_NODE") or gpus_from_env(env)
             or _int(env, "SLURM_GPUS_PER_TASK") or 1)
    return DistEnv(master_addr, master_port, nnodes, node_rank, nproc, nnodes * nproc, None,
                   None, True, job_id, tuple(hosts))


# ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("task", "node"), default="task",
                   help="task: one srun task per process (exports RANK etc.); "
                        "node: one launcher per node (torchrun / deepspeed)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="node mode: processes per node (default: GPUs on the node, else 1)")
    p.add_argument("--format", choices=("sh", "json"), default="sh")
    p.add_argument("--no-scontrol", action="store_true",
                   help="expand hostlists with the built-in parser only")
    p.add_argument("--expand", metavar="HOSTLIST", help="print the hostnames of HOSTLIST and exit")
    a = p.parse_args(argv)
    if a.expand is not None:
        print("\n".join(hostnames(a.expand, use_scontrol=not a.no_scontrol)))
        return 0
    try:
        d = from_env(mode=a.mode, nproc_per_node=a.nproc_per_node, use_scontrol=not a.no_scontrol)
    except ValueError as e:
        print(f"slurm_env: {e}", file=sys.stderr)
        return 2
    if a.format == "json":
        out = asdict(d)
        out["hosts"] = list(d.hosts)
        out["exports"] = d.exports(a.mode)
        print(json.dumps(out, indent=1))
    else:
        for k, v in d.exports(a.mode).items():
            print(f"export {k}={shlex.quote(v)}")
        print(f"export MEGAFIRE_HOSTS={shlex.quote(' '.join(d.hosts))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
