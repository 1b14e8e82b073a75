"""Unit tests of launch/slurm_env.py (no Slurm needed)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from slurm_testlib import ROOT
import slurm_env as se   # launch/ is put on sys.path by slurm_testlib.py


@pytest.mark.parametrize("hostlist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
    ("gpu-a100-[01-02],cpu[5]", ["gpu-a100-01", "gpu-a100-02", "cpu5"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("n[1-2].cluster.org", ["n1.cluster.org", "n2.cluster.org"]),
    ("localhost", ["localhost"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert se.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node1-3]", "node[a-b]", "node[3-1]"])
def test_expand_hostlist_rejects(bad):
    with pytest.raises(ValueError):
        se.expand_hostlist(bad)


def test_tasks_per_node_and_gres():
    assert se.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert se.parse_tasks_per_node("8") == [8]
    assert se.gpus_from_env({"SLURM_GPUS_ON_NODE": "4"}) == 4
    assert se.gpus_from_env({"SLURM_GPUS_PER_NODE": "gpu:a100:8"}) == 8
    assert se.gpus_from_env({"SLURM_GPUS_PER_NODE": "h100:2"}) == 2
    assert se.gpus_from_env({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert se.gpus_from_env({}) is None


def test_master_port_is_stable_and_in_range():
    p = se.master_port_for_job("123456")
    assert p == se.master_port_for_job(123456)
    assert se.PORT_BASE <= p < se.PORT_BASE + se.PORT_SPAN
    assert se.master_port_for_job("123457") != p
    assert se.master_port_for_job(None) == se.DEFAULT_PORT
    assert se.master_port_for_job("77_3") == se.master_port_for_job("773")   # array-ish ids


def _slurm(**kw):
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2"}
    env.update({k: str(v) for k, v in kw.items()})
    return env


def test_task_mode_multi_node():
    env = _slurm(SLURM_NTASKS=16, SLURM_PROCID=11, SLURM_LOCALID=3, SLURM_NODEID=1,
                 SLURM_TASKS_PER_NODE="8(x2)")
    d = se.from_env(env, mode="task", use_scontrol=False)
    assert (d.master_addr, d.master_port) == ("gpu07", se.master_port_for_job("4242"))
    assert (d.rank, d.world_size, d.local_rank, d.nproc_per_node) == (11, 16, 3, 8)
    assert (d.node_rank, d.nnodes) == (1, 2)
    ex = d.exports("task")
    assert ex["RANK"] == "11" and ex["WORLD_SIZE"] == "16" and ex["LOCAL_RANK"] == "3"
    assert ex["LOCAL_WORLD_SIZE"] == "8" and ex["MASTER_ADDR"] == "gpu07"


def test_task_mode_uneven_tasks_per_node():
    env = _slurm(SLURM_JOB_NODELIST="n[1-3]", SLURM_NNODES=3, SLURM_NTASKS=5, SLURM_PROCID=4,
                 SLURM_LOCALID=0, SLURM_NODEID=2, SLURM_TASKS_PER_NODE="2(x2),1")
    d = se.from_env(env, mode="task", use_scontrol=False)
    assert d.nproc_per_node == 1 and d.world_size == 5 and d.master_addr == "n1"


def test_step_nodelist_preferred_and_overrides():
    env = _slurm(SLURM_STEP_NODELIST="gpu08", SLURM_NTASKS=1, SLURM_PROCID=0, SLURM_LOCALID=0,
                 SLURM_NODEID=0)
    assert se.from_env(env, use_scontrol=False).master_addr == "gpu08"
    env.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    d = se.from_env(env, use_scontrol=False)
    assert (d.master_addr, d.master_port) == ("10.0.0.1", 1234)


def test_task_mode_needs_srun_variables():
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        se.from_env(_slurm(), mode="task", use_scontrol=False)


def test_node_mode():
    env = _slurm(SLURM_NODEID=1, SLURM_GPUS_ON_NODE=4)
    d = se.from_env(env, mode="node", use_scontrol=False)
    assert (d.nnodes, d.node_rank, d.nproc_per_node, d.world_size) == (2, 1, 4, 8)
    assert d.rank is None and "RANK" not in d.exports("node")
    assert se.from_env(env, mode="node", nproc_per_node=2, use_scontrol=False).world_size == 4


def test_without_slurm():
    d = se.from_env({}, mode="task")
    assert (d.rank, d.world_size, d.master_addr, d.master_port) == (0, 1, "127.0.0.1", se.DEFAULT_PORT)
    d = se.from_env({}, mode="node", nproc_per_node=3)
    assert (d.nnodes, d.nproc_per_node, d.world_size) == (1, 3, 3)
    d = se.from_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "2000"}, mode="task")
    assert (d.rank, d.world_size, d.local_rank, d.master_port) == (1, 2, 1, 2000)


def test_cli_exports_are_sourceable(tmp_path):
    env = {"PATH": "/usr/bin:/bin", **_slurm(SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_LOCALID=1,
                                             SLURM_NODEID=0, SLURM_JOB_NODELIST="h[1-2]")}
    out = subprocess.run(
        ["bash", "-c", f'eval "$({sys.executable} {ROOT}/launch/slurm_env.py --no-scontrol)"; '
                       'echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MEGAFIRE_HOSTS"'],
        env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "1 2 1 h1 h1 h2"
    out = subprocess.run([sys.executable, str(ROOT / "launch/slurm_env.py"), "--no-scontrol",
                          "--expand", "x[1-2,5]"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["x1", "x2", "x5"]


def test_task_wrapper_without_slurm():
    """launch/task.sh outside Slurm: rank 0 of 1 on 127.0.0.1, command exec'd."""
    out = subprocess.run(["bash", str(ROOT / "launch/task.sh"), "bash", "-c",
                          'echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT"'],
                         env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "1", "0", "127.0.0.1", str(se.DEFAULT_PORT)]
