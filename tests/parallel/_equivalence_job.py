"""2-rank job (torchrun): every layout of LAYOUTS_2 x every encoding trains the tiny model,
and the runs of EXTRA_2;
plus TP=2 gradients (through the trainer's hooks) == TP=1 gradients for every encoding.

argv: OUT_DIR STEPS. Writes OUT_DIR/<layout>-<encoding>/ (runs) and OUT_DIR/ranks.json:
{"<layout>-<encoding>": [[loss per step on rank 0], [... rank 1]], "grads": {encoding: max abs diff}}.
"""
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel_testlib import ENCODINGS, EXTRA_2, LAYOUTS_2, tiny  # noqa: E402


def tp_gradients_match(out: Path) -> dict:
    """Per encoding: max |g2 - g1| / max |g1| over the encoding's parameters, g2 the TP=2
    gradient (hooks as in the trainer), g1 the matching slice of the TP=1 gradient. (One scale
    per encoding: some entries are ~0 by symmetry, e.g. FIRE's output bias, which shifts a whole
    softmax row.)"""
    from megafire.model import GPT, lm_loss
    from megafire.parallel import ParallelContext, init_parallel, install_tp_replicated_grad_hooks
    from megafire.train.universal import shard_state_dict
    ctx2 = init_parallel(tp=2)
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(2)]
    ctx1 = ParallelContext(tp_rank=0, tp_size=1, tp_group=singles[rank])
    result = {}
    for enc in ENCODINGS:
        cfg = tiny(out / "grads", enc)
        m1, m2 = GPT.from_config(cfg, ctx1, seed=3), GPT.from_config(cfg, ctx2, seed=3)
        install_tp_replicated_grad_hooks(m2, ctx2.tp_group)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
        pos = torch.arange(16).expand(2, 16)
        # not lm_loss for the TP=1 model: megatron's vocab-parallel loss reads the global TP group (2)
        torch.nn.functional.cross_entropy(m1(x, pos).flatten(0, 1), y.flatten()).backward()
        lm_loss(m2(x, pos), y).backward()
        full = {n: p.grad for n, p in m1.named_parameters() if p.grad is not None}
        expect = shard_state_dict(full, cfg, rank, 2)
        diff, scale = 0.0, 0.0
        for n, p in m2.named_parameters():
            if "encoding" in n and p.grad is not None:
                diff = max(diff, float((p.grad - expect[n]).abs().max()))
                scale = max(scale, float(expect[n].abs().max()))
        result[enc] = diff / scale if scale else diff
    return result


def main():
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    from megafire.parallel import init_distributed
    from megafire.train.loop import train
    init_distributed("gloo")
    record = {}
    for enc in ENCODINGS:
        for name, parallel in LAYOUTS_2.items():
            seen = []
            cfg = tiny(out / f"{name}-{enc}", enc, parallel, max_steps=steps)
            train(cfg, callbacks=[lambda trainer, rec: seen.append(rec["loss"])])
            gathered = [None, None]
            dist.all_gather_object(gathered, seen)
            record[f"{name}-{enc}"] = gathered
    for name, (enc, parallel, sections, _) in EXTRA_2.items():
        seen = []
        train(tiny(out / name, enc, parallel, sections, max_steps=steps),
              callbacks=[lambda trainer, rec: seen.append(rec["loss"])])
        gathered = [None, None]
        dist.all_gather_object(gathered, seen)
        record[name] = gathered
    record["grads"] = tp_gradients_match(out)
    if dist.get_rank() == 0:
        (out / "ranks.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
