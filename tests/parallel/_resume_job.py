"""2-rank job (torchrun): for each layout, an uninterrupted run and a run that crashes after
step 3 (checkpoint at step 2) and resumes; also a TP=2/PP=2 -> TP=1 (any) conversion check.

argv: OUT_DIR LAYOUT[,LAYOUT...]. Writes OUT_DIR/<layout>-full, <layout>-cut (runs).
"""
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402

from parallel_testlib import LAYOUTS_2, tiny  # noqa: E402


class Crash(RuntimeError):
    pass


def crash_after(step):
    def callback(trainer, record):
        if record["step"] == step:
            raise Crash(f"simulated crash after step {step}")
    return callback


def main():
    out, names = Path(sys.argv[1]), sys.argv[2].split(",")
    from megafire.parallel import init_distributed
    from megafire.train.loop import train
    init_distributed("gloo")
    for name in names:
        parallel = LAYOUTS_2[name]
        train(tiny(out / f"{name}-full", "fire", parallel, max_steps=4))
        cut = tiny(out / f"{name}-cut", "fire", parallel, max_steps=4, checkpoint_every_steps=2)
        try:
            train(cut, callbacks=[crash_after(3)])
            raise SystemExit("the crash callback did not fire")
        except Crash:
            pass
        train(tiny(out / f"{name}-cut", "fire", parallel, max_steps=4, checkpoint_every_steps=2, resume=True))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
