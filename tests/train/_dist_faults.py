"""Run under torchrun (2 ranks, gloo): a NaN loss on one rank only in step 2, under DP=2 ZeRO-1,
PP=2 ZeRO-1 and TP=2 ZeRO-0; and DP=2 ZeRO-3 with NaN in the padding of every partition, which
holds no weight: the checkpoints must be written (the pre-save check reads only real weights).

Both ranks must skip step 2's update alike: the weights after step 2 equal those after step 1
(a rank that applied its update would change its partition or stage), and step 3 trains again.
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


def poisoned(rank: int, step: int, micro_steps: int):
    """model_factory: NaN out of the embedding on ``rank``'s micro-batches of 1-based ``step``."""
    calls = {"n": 0}

    def factory(cfg, ctx):
        model = build_model(cfg, ctx)

        def hook(module, args, output):
            calls["n"] += 1
            bad = dist.get_rank() == rank and (calls["n"] - 1) // micro_steps + 1 == step
            return output * float("nan") if bad else output
        model.embedding.word.register_forward_hook(hook)   # the pipeline calls the word embedding directly
        return model
    return factory


def poison_padding(trainer, record) -> None:
    """A callback (after the step, before its checkpoint): NaN into every ZeRO-3 partition's
    padding (the tail of the last rank's partition past the parameter's own elements)."""
    for p in trainer.engine.module.parameters():
        part = p.ds_tensor.ds_numel
        valid = max(0, min(part, p.ds_numel - dist.get_rank(group=p.ds_process_group) * part))
        p.ds_tensor.view(-1)[valid:] = float("nan")


def run(name: str, parallel: dict, factory, callbacks=()) -> dict:
    c = tiny_config(out / name, {"curriculum": {"stages": []}, "data": {"seq_len": 16}, "parallel": parallel,
                                 "train": {"max_steps": 3, "tokens_per_step": 64, "micro_batch_tokens": 32,
                                           "checkpoint_every_steps": 1, "keep_checkpoints": 0}})
    result = train(c, model_factory=factory, callbacks=callbacks)
    dist.barrier()
    if os.environ["RANK"] != "0":
        return {}
    from megafire.train.universal import consolidated_state_dict
    root = out / name / "checkpoints"
    w = [consolidated_state_dict(root / f"step_{s:08d}")[1] for s in (1, 2, 3)]
    return {"skipped": [r["skipped"] for r in read_metrics(out / name)], "skipped_steps": result.skipped_steps,
            "same_after_1_and_2": all(torch.equal(w[0][k], w[1][k]) for k in w[0]),
            "changed_by_3": any(not torch.equal(w[1][k], w[2][k]) for k in w[1]),
            "finite": all(bool(torch.isfinite(v).all()) for v in w[2].values())}


# DP=2 ZeRO-1: one micro-batch per rank and step, NaN on rank 1 only (DeepSpeed's norm check skips)
results = {"dp2-z1": run("dp2-z1", {"zero_stage": 1}, poisoned(1, 2, 1))}
dist.barrier()
# PP=2 ZeRO-1: two micro-batches per step through DeepSpeed's schedule, NaN on the first stage
results["pp2-z1"] = run("pp2-z1", {"pp": 2, "zero_stage": 1}, poisoned(0, 2, 2))
dist.barrier()
# TP=2 ZeRO-0 fp32: two micro-batches per step, NaN on rank 0 (our guard on the torch optimizer skips)
results["tp2-z0"] = run("tp2-z0", {"tp": 2, "zero_stage": 0}, poisoned(0, 2, 2))
dist.barrier()
results["dp2-z3-padding"] = run("dp2-z3-padding", {"zero_stage": 3}, build_model, callbacks=[poison_padding])
if os.environ["RANK"] == "0":
    (out / "result.json").write_text(json.dumps(results))
dist.barrier()
destroy_parallel()
