"""2-rank job (torchrun): a stop request by file (``run.dir/STOP``), which only rank 0 reads.

For each layout: an uninterrupted 6-step run; a run whose rank 0 writes STOP after step 3
(rank 1 never sees the file: it must stop through the agreement), then a resume to step 6.
argv: OUT_DIR LAYOUT[,LAYOUT...]. Writes OUT_DIR/<layout>-full, <layout>-cut (runs) and
OUT_DIR/<layout>-rank<r>.json (what train() returned on each rank for the stopped run).
"""
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402

from parallel_testlib import LAYOUTS_2, tiny  # noqa: E402


def stop_file_after(step):
    def callback(trainer, record):
        if record["step"] == step and trainer.rank == 0:
            (trainer.run_dir / "STOP").touch()
    return callback


def main():
    out, names = Path(sys.argv[1]), sys.argv[2].split(",")
    from megafire.parallel import init_distributed
    from megafire.train.loop import train
    init_distributed("gloo")
    rank = dist.get_rank()
    for name in names:
        parallel = LAYOUTS_2[name]
        train(tiny(out / f"{name}-full", "fire", parallel, max_steps=6))
        cut = out / f"{name}-cut"
        result = train(tiny(cut, "fire", parallel, max_steps=6), callbacks=[stop_file_after(3)])
        dist.barrier()   # rank 0 removes STOP after the commit; read it once everyone is back
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(
            {"steps": result.steps, "stopped": result.stopped_by_signal, "stop_file_left": (cut / "STOP").exists()}))
        dist.barrier()
        train(tiny(cut, "fire", parallel, max_steps=6, resume=True))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
