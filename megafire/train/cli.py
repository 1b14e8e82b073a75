"""``megafire train --config FILE [--ds-config FILE] [--section.key=value ...]``.

Examples::

    megafire train --config configs/demo-cpu.yaml --run.dir=runs/demo
    megafire train --config configs/arms/125m-fire.yaml --run.dir=$SCRATCH/125m-fire --train.resume=true
    torchrun --nproc-per-node 8 -m megafire.cli train --config configs/arms/350m-rope.yaml

``--ds-config`` merges a DeepSpeed JSON file over the ds_config built from the config
(for DeepSpeed options that our config does not expose). ``--init-from PATH`` starts the
run (step 0, fresh optimizer) from the weights of another run or checkpoint in any layout
(tp / pp / ZeRO; megafire.train.universal), e.g. to continue a TP=2 x PP=2 run at TP=1.

Exit status: 0 when max_steps is reached; 124 after a stop on SIGUSR1 / SIGTERM (a checkpoint
was written; resume with --train.resume=true; slurm/README.md); 2 on a bad config.
"""
from __future__ import annotations

import os
import sys

USAGE = __doc__
#: stopped by SIGUSR1/SIGTERM after a checkpoint: the Slurm scripts requeue on it (slurm/README.md)
EXIT_STOPPED = 124


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    import warnings
    # megatron-core warns at import that optional CUDA packages are absent, and per layer that
    # tp_group will be mandatory; neither is actionable here and they bury the progress lines.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*tp_group is None.*")
    from megafire.config import ConfigError, load_config
    config_path = ds_config_path = init_from = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        for flag in ("--config", "--ds-config", "--init-from"):
            if arg == flag or arg.startswith(flag + "="):
                value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
                if value is None:
                    print(f"megafire train: {flag} needs a file", file=sys.stderr)
                    return 2
                i += 0 if "=" in arg else 1
                if flag == "--config":
                    config_path = value
                elif flag == "--init-from":
                    init_from = value
                else:
                    ds_config_path = value
                break
        else:
            rest.append(arg)
        i += 1
    try:
        cfg = load_config(config_path, rest)
        from .engine import read_ds_config
        override = read_ds_config(ds_config_path) if ds_config_path else None
        from .loop import train
        extra = {}
        if init_from:
            from .universal import init_from_factory
            extra["model_factory"] = init_from_factory(init_from)
        result = train(cfg, ds_config_override=override, **extra)
    except ConfigError as e:
        print(f"megafire train: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":   # one summary line, not one per rank
        print(f"[megafire.train] done: {result.steps} steps, {result.tokens:,} tokens, final loss "
              f"{result.final_loss:.4f}; run directory {result.run_dir}", file=sys.stderr)
    return EXIT_STOPPED if result.stopped_by_signal else 0
