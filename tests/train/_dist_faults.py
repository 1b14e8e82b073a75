"""Run under torchrun (2 ranks, gloo): DP=2 ZeRO-1, a NaN loss on rank 1 only in step 2.

Both ranks must skip step 2's update alike: the weights after step 2 equal those after step 1
(a rank that applied its update would change its partition), and step 3 trains again.
Writes {out}/result.json on rank 0.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _train_util import tiny_config  # noqa: E402
from megafire.parallel import destroy_parallel, init_parallel  # noqa: E402
from megafire.train.components import build_model  # noqa: E402
from megafire.train.loop import train  # noqa: E402
from megafire.train.metrics import read_metrics  # noqa: E402

out = Path(sys.argv[1])
init_parallel(1, 1, "gloo")
calls = {"n": 0}


def poisoned_on_rank_1(cfg, ctx):
    model = build_model(cfg, ctx)

    def hook(module, args, output):   # one micro-batch per step per rank (64 tokens / dp 2 / 32 per micro-batch)
        calls["n"] += 1
        return output * float("nan") if dist.get_rank() == 1 and calls["n"] == 2 else output
    model.embedding.register_forward_hook(hook)
    return model


c = tiny_config(out / "run", {"curriculum": {"stages": []}, "data": {"seq_len": 16}, "parallel": {"zero_stage": 1},
                              "train": {"max_steps": 3, "tokens_per_step": 64, "micro_batch_tokens": 32,
                                        "checkpoint_every_steps": 1, "keep_checkpoints": 0}})
result = train(c, model_factory=poisoned_on_rank_1)
dist.barrier()
if os.environ["RANK"] == "0":
    from megafire.train.universal import consolidated_state_dict
    root = out / "run" / "checkpoints"
    w = [consolidated_state_dict(root / f"step_{s:08d}")[1] for s in (1, 2, 3)]
    (out / "result.json").write_text(json.dumps({
        "skipped": [r["skipped"] for r in read_metrics(out / "run")],
        "skipped_steps": result.skipped_steps,
        "same_after_1_and_2": all(torch.equal(w[0][k], w[1][k]) for k in w[0]),
        "changed_by_3": any(not torch.equal(w[1][k], w[2][k]) for k in w[1]),
        "finite": all(bool(torch.isfinite(v).all()) for v in w[2].values())}))
dist.barrier()
destroy_parallel()
