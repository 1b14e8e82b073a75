"""The study plan (``configs/study/plan.yaml``): arms, seeds, token budget, data, evaluation.

An arm names a training config (``base:`` inheritance as everywhere) and optionally its
seeds, the inference-time RoPE scalings to evaluate it with (``eval_scalings``: ``none``,
``linear`` = position interpolation, ``yarn``; factor = eval length / training length), an
``ablation`` note with the arm it differs from in one thing (``baseline``; ``fire`` when not
given), and its own token budget (``tokens``: a number of tokens, or ``"0.5x"``: a multiple of
the plan's budget, which ``study run --tokens`` sets). A job is one (arm, seed): one training
run in ``OUT/runs/<arm>-s<seed>``; ``select_jobs`` takes arms or single jobs (``arm-s<seed>``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from megafire.config import ConfigError

SCALINGS = ("none", "linear", "yarn")
#: row names of the inference-time variants in the report ("rope" + "_pi" / "_yarn")
VARIANT_SUFFIX = {"none": "", "linear": "_pi", "yarn": "_yarn"}
#: the arm an ablation differs from when its plan entry names none (the study's first ablations)
DEFAULT_BASELINE = "fire"
_MULTIPLE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*x\s*$")


@dataclass
class Arm:
    name: str
    config: Path
    seeds: list[int]
    scalings: list[str] = field(default_factory=lambda: ["none"])
    ablation: str = ""
    baseline: str = ""
    tokens: Optional[int | str] = None     # None: the plan's budget; int: tokens; "0.5x": a multiple of it

    def budget(self, plan_tokens: int) -> int:
        """Training tokens of this arm's runs when the plan's budget is ``plan_tokens``."""
        if self.tokens is None:
            return plan_tokens
        if isinstance(self.tokens, str):
            return int(float(_MULTIPLE.match(self.tokens).group(1)) * plan_tokens)
        return int(self.tokens)


@dataclass
class EvalPlan:
    sets: dict[str, Path]
    multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    max_windows: int = 64
    batch_size: int = 1
    passkey_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 5
    passkey_digits: int = 5

    def settings(self) -> dict:
        """What determines an evaluation's numbers (a run is re-evaluated when this changes)."""
        return {"sets": {k: str(v) for k, v in sorted(self.sets.items())}, "multiples": self.multiples,
                "max_windows": self.max_windows, "passkey_multiples": self.passkey_multiples,
                "passkey_depths": self.passkey_depths, "passkey_trials": self.passkey_trials,
                "passkey_digits": self.passkey_digits}


@dataclass
class DataPlan:
    tokenizer_dir: Path
    shards_dir: Path
    shards_archive: Optional[Path] = None
    summary: Optional[Path] = None


@dataclass
class Plan:
    path: Path
    arms: dict[str, Arm]
    tokens: int
    concurrency: int
    data: DataPlan
    eval: EvalPlan
    data_root: Path


@dataclass
class Job:
    arm: Arm
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.arm.name}-s{self.seed}"


class PlanError(ConfigError):
    """A plan that names an unknown key, arm, scaling or a missing file (the CLI prints one line)."""


def _path(value, root: Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (root / p)


def load_plan(path: str | Path, data_root: str | Path = ".") -> Plan:
    """Read a plan; arm configs are relative to the plan file, data paths to ``data_root``."""
    path = Path(path).resolve()
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"tokens", "concurrency", "seeds", "arms", "data", "eval"}
    if unknown:
        raise PlanError(f"{path}: unknown key(s) {sorted(unknown)}")
    root = Path(data_root).resolve()
    default_seeds = [int(s) for s in raw.get("seeds", [1234])]
    arms = {}
    for name, spec in (raw.get("arms") or {}).items():
        bad = set(spec) - {"config", "seeds", "eval_scalings", "ablation", "baseline", "tokens"}
        if bad:
            raise PlanError(f"{path}: arm {name!r}: unknown key(s) {sorted(bad)}")
        if "-s" in name:
            raise PlanError(f"{path}: arm {name!r}: '-s' in an arm name is kept for job names (arm-s<seed>)")
        scalings = list(spec.get("eval_scalings", ["none"]))
        if "none" not in scalings or set(scalings) - set(SCALINGS):
            raise PlanError(f"{path}: arm {name!r}: eval_scalings must include 'none' and be among {SCALINGS}")
        config = _path(spec["config"], path.parent)
        if not config.is_file():
            raise PlanError(f"{path}: arm {name!r}: config {config} does not exist")
        ablation = str(spec.get("ablation", ""))
        baseline = str(spec.get("baseline", DEFAULT_BASELINE if ablation else ""))
        arms[name] = Arm(name, config, [int(s) for s in spec.get("seeds", default_seeds)], scalings,
                         ablation, baseline, _tokens(spec.get("tokens"), f"{path}: arm {name!r}"))
    if not arms:
        raise PlanError(f"{path}: no arms")
    for arm in arms.values():
        if arm.baseline and arm.baseline not in arms:
            raise PlanError(f"{path}: arm {arm.name!r}: baseline {arm.baseline!r} is not an arm of the plan")
    d = raw.get("data") or {}
    data = DataPlan(_path(d["tokenizer_dir"], root), _path(d["shards_dir"], root),
                    _path(d["shards_archive"], root) if d.get("shards_archive") else None,
                    _path(d["summary"], root) if d.get("summary") else None)
    e = dict(raw.get("eval") or {})
    sets = {k: _path(v, root) for k, v in (e.pop("sets", None) or {}).items()}
    if not sets:
        raise PlanError(f"{path}: eval.sets names no held-out set")
    try:
        ev = EvalPlan(sets, **e)
    except TypeError as err:
        raise PlanError(f"{path}: eval: {err}") from None
    return Plan(path, arms, int(raw.get("tokens", 0)), int(raw.get("concurrency", 1)), data, ev, root)


def _tokens(value, where: str) -> Optional[int | str]:
    """An arm's ``tokens``: a positive integer, or a positive multiple of the plan's budget ("0.5x")."""
    if value is None:
        return None
    if isinstance(value, str) and _MULTIPLE.match(value) and float(_MULTIPLE.match(value).group(1)) > 0:
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise PlanError(f"{where}: tokens must be a positive integer or a multiple of the plan's budget "
                    f"such as '0.5x', got {value!r}")


def split_job_name(name: str, arms) -> tuple[str, Optional[int]]:
    """``"arm"`` -> (arm, None); ``"arm-s1235"`` -> (arm, 1235) when ``arm`` is one of ``arms``."""
    arm, sep, seed = name.rpartition("-s")
    if sep and seed.isdigit() and arm in arms:
        return arm, int(seed)
    return name, None


def select_jobs(plan: Plan, out: Path, arms: Optional[list[str]] = None,
                seeds: Optional[list[int]] = None) -> list[Job]:
    """Jobs in plan order, or in the order of ``arms``: arm names (each with its seeds, or with
    ``seeds`` when given) and single jobs ``arm-s<seed>`` (that seed only); duplicates once."""
    names = arms or list(plan.arms)
    picked = [split_job_name(n, plan.arms) for n in names]
    unknown = [a for a, _ in picked if a not in plan.arms]
    if unknown:
        raise PlanError(f"unknown arm(s) {unknown}; the plan has {list(plan.arms)}")
    jobs: dict[str, Job] = {}
    for a, seed in picked:
        for s in [seed] if seed is not None else (seeds or plan.arms[a].seeds):
            jobs.setdefault(f"{a}-s{s}", Job(plan.arms[a], s, out / "runs" / f"{a}-s{s}"))
    return list(jobs.values())
