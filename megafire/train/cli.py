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
was written; resume with --train.resume=true; slurm/README.md); 2 on a bad config or a damaged
checkpoint; 3 when training diverged (a non-finite loss, gradient norm or weight: the message
names the step; no checkpoint was written for it; megafire.train.faults).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import os
import sys
import textwrap
import tokenize
import typing

OVERRIDES = """\
Configuration: every key has a default, so a YAML file (--config FILE) states only what
differs; a YAML file may name another one as `base: other.yaml` (relative to itself) and
state what differs from it. Then `--section.key=value` (or `--section.key value`) overrides
any key below; values are read as YAML (`--train.lr=3e-4`, `--train.resume=true`,
`--eval.length_multiples=[1,2,4]`, `--model.position.options.init_L=64`). Unknown keys and
values outside a key's choices are errors. The resolved config is saved as config.yaml in
the run directory and in every checkpoint."""
#: stopped by SIGUSR1/SIGTERM after a checkpoint: the Slurm scripts requeue on it (slurm/README.md)
EXIT_STOPPED = 124


def _field_docs(cls) -> dict[str, str]:
    """Field name -> its one-line doc: ``choice(doc=...)``, else the comment after the field,
    else the comment lines just above it (how megafire.config documents its fields)."""
    docs = {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return docs
    comments: dict[int, tuple[str, bool]] = {}   # line -> (comment text, whole-line comment)
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.start[0] not in code_lines)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    lines = source.splitlines()
    for no, line in enumerate(lines, 1):
        name = line.strip().split(":", 1)[0]
        if name not in docs or docs[name] or not line.strip().startswith(name + ":"):
            continue
        if no in comments and not comments[no][1]:
            docs[name] = comments[no][0]
            continue
        above, k = [], no - 1
        while k in comments and comments[k][1]:
            above.insert(0, comments[k][0])
            k -= 1
        docs[name] = " ".join(above)
    return docs


def _fields_help(cls, prefix: str) -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}.{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _fields_help(tp, key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = docs[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(item):
            doc = (doc + "; " if doc else "") + "a list of {" + ", ".join(x.name for x in dataclasses.fields(item)) + "}"
        if f.metadata.get("choices"):
            doc = (doc + "; " if doc else "") + "one of " + ", ".join(map(str, f.metadata["choices"]))
        import yaml   # values as an override or a YAML file spells them
        value = yaml.safe_dump(default, default_flow_style=True).removesuffix("\n").removesuffix("\n...")
        left = f"    {key}={value}"
        if len(left) > 43:
            out.append(left)
            left = ""
        out += textwrap.wrap(doc, 110, initial_indent=f"{left:<44}", subsequent_indent=" " * 44) or [left]
    return out


def config_help() -> str:
    """The config sections and their keys with defaults and docs, from megafire.config."""
    from megafire import config
    lines = ["config sections (--section.key=value; default shown):"]
    for f in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[f.name]
        lines += ["", f"  {f.name}: {(inspect.getdoc(cls) or '').splitlines()[0]}"]
        lines += _fields_help(cls, f.name)
    return "\n".join(lines)


def usage() -> str:
    head = "usage: megafire train --config FILE [--ds-config FILE] [--init-from PATH] [--section.key=value ...]"
    return "\n\n".join([head, __doc__.strip().split("\n\n", 1)[1], OVERRIDES, config_help()])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "-h" in argv or "--help" in argv:
        print(usage())
        return 0
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
                    raise ConfigError(f"megafire train: {flag} needs a file")
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
    # a ConfigError (bad key, value or file) becomes one `error:` line and exit 2 in megafire.cli
    cfg = load_config(config_path, rest)
    from .engine import read_ds_config
    override = read_ds_config(ds_config_path) if ds_config_path else None
    from .loop import train
    extra = {}
    if init_from:
        from .universal import init_from_factory
        extra["model_factory"] = init_from_factory(init_from)
    from .faults import EXIT_DIVERGED, TrainingDiverged
    try:
        result = train(cfg, ds_config_override=override, **extra)
    except TrainingDiverged as e:   # every rank stops at the same step: one line, from rank 0
        if os.environ.get("RANK", "0") == "0":
            from megafire.cli import error_line
            print(error_line(e), file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    if os.environ.get("RANK", "0") == "0":   # one summary line, not one per rank
        print(f"[megafire.train] done: {result.steps} steps, {result.tokens:,} tokens, final loss "
              f"{result.final_loss:.4f}; run directory {result.run_dir}", file=sys.stderr)
    return EXIT_STOPPED if result.stopped_by_signal else 0
