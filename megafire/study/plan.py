"""The study plan (``configs/study/plan.yaml``): arms, seeds, token budget, data, evaluation.

An arm names a training config (``base:`` inheritance as everywhere) and optionally its
seeds, the inference-time RoPE scalings to evaluate it with (``eval_scalings``: ``none``,
``linear`` = position interpolation, ``yarn``; factor = eval length / training length), and
an ``ablation`` note. A job is one (arm, seed): one training run in ``OUT/runs/<arm>-s<seed>``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from megafire.config import ConfigError

SCALINGS = ("none", "linear", "yarn")
#: row names of the inference-time variants in the report ("rope" + "_pi" / "_yarn")
VARIANT_SUFFIX = {"none": "", "linear": "_pi", "yarn": "_yarn"}


@dataclass
class Arm:
    name: str
    config: Path
    seeds: list[int]
    scalings: list[str] = field(default_factory=lambda: ["none"])
    ablation: str = ""


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
        bad = set(spec) - {"config", "seeds", "eval_scalings", "ablation"}
        if bad:
            raise PlanError(f"{path}: arm {name!r}: unknown key(s) {sorted(bad)}")
        scalings = list(spec.get("eval_scalings", ["none"]))
        if "none" not in scalings or set(scalings) - set(SCALINGS):
            raise PlanError(f"{path}: arm {name!r}: eval_scalings must include 'none' and be among {SCALINGS}")
        config = _path(spec["config"], path.parent)
        if not config.is_file():
            raise PlanError(f"{path}: arm {name!r}: config {config} does not exist")
        arms[name] = Arm(name, config, [int(s) for s in spec.get("seeds", default_seeds)], scalings,
                         str(spec.get("ablation", "")))
    if not arms:
        raise PlanError(f"{path}: no arms")
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


def select_jobs(plan: Plan, out: Path, arms: Optional[list[str]] = None,
                seeds: Optional[list[int]] = None) -> list[Job]:
    """Jobs in plan order (``arms`` picks and orders a subset; ``seeds`` replaces every arm's)."""
    names = arms or list(plan.arms)
    unknown = [a for a in names if a not in plan.arms]
    if unknown:
        raise PlanError(f"unknown arm(s) {unknown}; the plan has {list(plan.arms)}")
    return [Job(plan.arms[a], s, out / "runs" / f"{a}-s{s}") for a in names for s in (seeds or plan.arms[a].seeds)]
