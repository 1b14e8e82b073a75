"""Check and print how the ranks of a launch fall into tp x dp x pp groups.

``python -m megafire.parallel.describe --tp 2 --pp 2`` under torchrun/srun (gloo on CPU works):
every rank builds the groups through :func:`megafire.parallel.init_parallel`, they are
gathered on rank 0, checked against the layout contract (tp groups are runs of consecutive
ranks; dp groups stride by tp; pp groups stride by tp * dp; every rank is in exactly one
group of each kind; the groups of a kind partition the world), and printed as a table.
Exit status 1 if a check fails. The 8-GPU script's ``--dry-run`` runs this for each layout.
"""
from __future__ import annotations

import argparse
import sys

import torch.distributed as dist


def group_ranks(group) -> list[int]:
    return sorted(dist.get_process_group_ranks(group)) if group is not None else [dist.get_rank()]


def expected_groups(world: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """The groups of megatron's ``tp-dp-pp`` order (tp fastest, pp slowest)."""
    dp = world // (tp * pp)
    rank = lambda t, d, p: t + tp * d + tp * dp * p  # noqa: E731
    return {
        "tp": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
    }


def check(rows: list[dict], world: int, tp: int, pp: int) -> list[str]:
    """Problems found in the gathered rows (empty: all good)."""
    want = expected_groups(world, tp, pp)
    problems = []
    for kind in ("tp", "dp", "pp"):
        got = sorted({tuple(r[f"{kind}_group"]) for r in rows})
        if sorted(tuple(g) for g in want[kind]) != got:
            problems.append(f"{kind} groups {got} != expected {sorted(tuple(g) for g in want[kind])}")
    for r in rows:
        for kind in ("tp", "dp", "pp"):
            if r[f"{kind}_group"].index(r["rank"]) != r[f"{kind}_rank"]:
                problems.append(f"rank {r['rank']}: {kind}_rank {r[f'{kind}_rank']} is not its place in "
                                f"{r[f'{kind}_group']}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args(argv)
    from megafire.parallel import destroy_parallel, init_parallel
    ctx = init_parallel(args.tp, args.pp)
    row = {"rank": dist.get_rank(), "tp_rank": ctx.tp_rank, "dp_rank": ctx.dp_rank, "pp_rank": ctx.pp_rank,
           "tp_group": group_ranks(ctx.tp_group), "dp_group": group_ranks(ctx.dp_group),
           "pp_group": group_ranks(ctx.pp_group)}
    world = dist.get_world_size()
    rows = [None] * world
    dist.all_gather_object(rows, row)
    status = 0
    if dist.get_rank() == 0:
        print(f"world {world} = tp {args.tp} x dp {ctx.dp_size} x pp {args.pp}")
        print("rank  tp dp pp  tp_group        dp_group        pp_group")
        for r in rows:
            print(f"{r['rank']:4d}  {r['tp_rank']:2d} {r['dp_rank']:2d} {r['pp_rank']:2d}  {str(r['tp_group']):15s} "
                  f"{str(r['dp_group']):15s} {r['pp_group']}")
        problems = check(rows, world, args.tp, args.pp)
        print("groups OK" if not problems else "GROUP PROBLEMS:\n  " + "\n  ".join(problems))
        status = 1 if problems else 0
    flag = [status]
    dist.broadcast_object_list(flag, src=0)
    destroy_parallel()
    return flag[0]


if __name__ == "__main__":
    sys.exit(main())
