"""Run under torchrun (2 ranks, gloo): DP=2 ZeRO-2 training, uninterrupted vs killed + resumed.

Writes {out}/result.json on rank 0 with both loss traces and the checkpoint's rank files.
One launch does all three runs so the ~20 s of imports are paid once per rank.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch.distributed as dist  # noqa: E402

from _train_util import Crash, crash_after, tiny_config  # noqa: E402
from megafire.train.loop import train  # noqa: E402
from megafire.train.metrics import read_metrics  # noqa: E402

from megafire.parallel import destroy_parallel, init_parallel  # noqa: E402

out = Path(sys.argv[1])
init_parallel(1, 1, "gloo")   # one world for the three runs (train() leaves a world it did not create)
common = {"parallel": {"zero_stage": 2}, "train": {"checkpoint_every_steps": 2, "max_steps": 4}}
train(tiny_config(out / "full", common))
try:
    train(tiny_config(out / "killed", common), callbacks=[crash_after(3)])
except Crash:
    pass
resumed = {**common, "train": {**common["train"], "resume": True}}
result = train(tiny_config(out / "killed", resumed))
import os  # noqa: E402
if os.environ["RANK"] == "0":
    keys = ("step", "loss", "lr", "grad_norm", "seq_len")
    trace = lambda run: [[r[k] for k in keys] for r in read_metrics(out / run)]  # noqa: E731
    ckpt = out / "killed" / "checkpoints" / "step_00000004"
    (out / "result.json").write_text(json.dumps({
        "full": trace("full"), "resumed": trace("killed"), "steps": result.steps,
        "files": sorted(p.name for p in ckpt.iterdir()), "ds_files": sorted(p.name for p in (ckpt / "ds").iterdir())}))
dist.barrier()
destroy_parallel()
