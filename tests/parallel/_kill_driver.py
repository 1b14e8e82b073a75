"""Single-process training for the kill tests. argv: RUN_DIR [KILL_IN_WRITE_STEP].

With a step, the process SIGKILLs itself while writing that step's checkpoint: after every
file is in ``.tmp-step_*`` and before the rename that commits it (the worst moment).
"""
import os
import signal
import sys
import warnings

warnings.filterwarnings("ignore")

from parallel_testlib import tiny  # noqa: E402


def main():
    run_dir = sys.argv[1]
    kill_step = int(sys.argv[2]) if len(sys.argv) > 2 else None
    from megafire.train import checkpoint as ckpt
    from megafire.train.loop import train
    original = ckpt.save_checkpoint

    def save_checkpoint(*args, step, before_commit=None, **kwargs):
        if step == kill_step:
            before_commit = lambda tmp: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
        return original(*args, step=step, before_commit=before_commit, **kwargs)
    ckpt.save_checkpoint = save_checkpoint
    train(tiny(run_dir, "fire", max_steps=8, checkpoint_every_steps=1, keep_checkpoints=3))


if __name__ == "__main__":
    main()
