"""2-rank job (torchrun): sequence parallelism (TP=2 + SP) against TP=2 and TP=1.

argv: OUT_DIR BACKEND (gloo on CPU, nccl on two GPUs). For each case (fire, rope, fire with
linear biases and packed documents), the tiny GPT at TP=1, TP=2 and TP=2+SP (same seed) takes
one forward/backward on the same batch; gradients of the TP models go through the trainer's
TP-replicated hooks. Then the real trainer runs 4 steps of TP=2 and of TP=2+SP. Rank 0 writes
OUT_DIR/sp.json: {"grads": {case: {...}}, "train": {"tp2": [...], "tp2-sp": [...]}}.
"""
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel_testlib import losses, tiny  # noqa: E402

CASES = {
    "fire": ("fire", {}),
    "rope": ("rope", {}),
    "fire-bias-docs": ("fire", {"model": {"linear_bias": True}}),
}


def _max_rel(got: dict, want: dict) -> float:
    """max over tensors of max |got - want| / scale, scale = max |want| of the tensor, floored at
    1e-3 of the largest gradient entry (some gradients are ~0 by symmetry, e.g. FIRE's output
    bias, which shifts a whole softmax row: their relative error would measure rounding noise)."""
    floor = 1e-3 * max(float(want[n].abs().max()) for n in got)
    return max(float((got[n].cpu() - want[n].cpu()).abs().max()) / max(float(want[n].abs().max()), floor)
               for n in got)


def compare_models(out: Path, device: torch.device) -> dict:
    from megafire.model import GPT, lm_loss
    from megafire.parallel import ParallelContext, init_parallel, install_tp_replicated_grad_hooks
    from megafire.train.universal import shard_state_dict
    ctx2 = init_parallel(tp=2)
    ctx_sp = init_parallel(tp=2, sequence_parallel=True)
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(2)]
    ctx1 = ParallelContext(tp_rank=0, tp_size=1, tp_group=singles[rank], backend=ctx2.backend)
    result = {}
    for name, (enc, sections) in CASES.items():
        cfg = tiny(out / "grads", enc, sections=sections)
        models = [GPT.from_config(c, cx, seed=3).to(device) for c, cx in ((cfg, ctx1), (cfg, ctx2), (cfg, ctx_sp))]
        m1, m2, m3 = models
        n_hooked = [install_tp_replicated_grad_hooks(m, ctx2.tp_group) for m in (m2, m3)]
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
        pos = torch.arange(16).expand(2, 16)
        seg = None
        if name.endswith("docs"):   # two packed documents in row 0, positions restarting
            seg = torch.zeros(2, 16, dtype=torch.long)
            seg[0, 10:] = 1
            pos = pos.clone()
            pos[0, 10:] = torch.arange(6)
        x, y, pos = x.to(device), y.to(device), pos.to(device)
        seg = seg.to(device) if seg is not None else None
        # TP=1: plain cross entropy (megatron's vocab-parallel loss reads the global TP group of 2)
        loss1 = torch.nn.functional.cross_entropy(m1(x, pos, seg).flatten(0, 1).float(), y.flatten())
        loss1.backward()
        loss2 = lm_loss(m2(x, pos, seg), y)
        loss2.backward()
        loss3 = lm_loss(m3(x, pos, seg), y)
        loss3.backward()
        full = {n: p.grad.cpu() for n, p in m1.named_parameters() if p.grad is not None}
        expect = shard_state_dict(full, cfg, rank, 2)
        g2 = {n: p.grad for n, p in m2.named_parameters() if p.grad is not None}
        g3 = {n: p.grad for n, p in m3.named_parameters() if p.grad is not None}
        assert set(g2) == set(g3), set(g2) ^ set(g3)
        norm_keys = [n for n in g3 if "norm" in n]
        result[name] = {
            "loss": [float(loss1), float(loss2), float(loss3)],
            "hooked": n_hooked,
            "max_rel_grad_sp_vs_tp2": _max_rel(g3, g2),
            "max_rel_grad_sp_vs_tp1": _max_rel(g3, expect),
            "max_rel_grad_tp2_vs_tp1": _max_rel(g2, expect),
            "max_rel_norm_grad_sp_vs_tp1": _max_rel({n: g3[n] for n in norm_keys}, expect),
            "num_params": len(g3),
        }
        # both TP ranks must hold the same (summed) gradient of every replicated parameter
        for n, p in m3.named_parameters():
            if getattr(p, "megafire_tp_replicated", False):
                other = p.grad.clone()
                dist.broadcast(other, src=dist.get_global_rank(ctx2.tp_group, 0), group=ctx2.tp_group)
                assert torch.equal(other, p.grad), f"{name}: {n} gradient differs between TP ranks"
    return result


def main():
    out, backend = Path(sys.argv[1]), sys.argv[2]
    from megafire.parallel import init_distributed
    from megafire.train.loop import train
    device = torch.device("cpu")
    if backend == "nccl":
        import os
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    init_distributed(backend)
    record = {"grads": compare_models(out, device), "train": {}}
    for name, parallel in {"tp2": {"tp": 2}, "tp2-sp": {"tp": 2, "sequence_parallel": True}}.items():
        train(tiny(out / name, "fire", parallel, max_steps=4))
        dist.barrier()
        record["train"][name] = losses(out / name)
    if dist.get_rank() == 0:
        (out / "sp.json").write_text(json.dumps(record, indent=1))
        print(json.dumps(record, indent=1))
    from megafire.parallel import destroy_parallel
    destroy_parallel()


if __name__ == "__main__":
    main()
