"""Sweep specs: the YAML files under ``tune/`` and their mapping to Ray Tune.

A spec names the training config it starts from (``base``), what to optimise
(``metric``, ``mode``), how (``scheduler`` asha|fifo, ``max_t`` epochs,
``grace_period``, ``reduction_factor``, ``num_samples``, ``max_concurrent``,
``resources_per_trial``), the search ``space`` (dotted config keys ->
``{type: grid|choice|loguniform|uniform|randint, values | low/high}``), optional
``overrides`` applied to the base (dotted ``key=value`` strings or a mapping)
the search ``seed``, and an optional ``tie_breaker`` ({metric, mode}: a second
per-epoch metric that ranks trials whose ``metric`` is exactly equal, for the
scheduler and for picking the best).  ``randint`` draws integers in
``low..high`` with both ends included.

``search`` picks how trials are drawn (default: Ray's random/grid variant generator):
``{algorithm: optuna, sampler: tpe, n_startup_trials: N}`` draws each new trial with
Optuna's TPE, seeded with ``seed``, from the results of the trials before it (the first N at
random); ``storage: journal, path: FILE`` keeps the study in Optuna's append-only journal
file, which several ``trd-hpc tune`` processes (SLURM array tasks) share: each one's TPE sees
every process's finished trials (``study_name`` names the study in the file).

Everything is checked before Ray starts: the spec's own keys (pydantic; errors
name the key), that each space key exists in the base config, and that samples
of the space (every combination of the discrete values, the continuous ranges
at both ends) give valid experiment configs.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trd_hpc import resources
from trd_hpc.config import (
    ConfigError,
    _read_config_file,
    _read_yaml,
    format_validation_error,
    merge_overrides,
    set_dotted,
    to_dict,
    validate_experiment,
)
from trd_hpc.sections import TieBreaker

# Keys the sweep sets itself in every trial.
SWEEP_OWNED = ("train.max_epochs", "data.cohort")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
MAX_CHECKED_COMBINATIONS = 512


def _number_or_same(v: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string; treat number-looking strings as numbers."""
    if isinstance(v, str) and _NUMBER.match(v.strip()):
        f = float(v)
        return int(f) if re.fullmatch(r"[+-]?\d+", v.strip()) else f
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(_Strict):
    """One searched hyper-parameter."""

    type: Literal["grid", "choice", "loguniform", "uniform", "randint"]
    values: Optional[list[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None

    @field_validator("values", mode="before")
    @classmethod
    def _numbers(cls, v: Any) -> Any:
        return [_number_or_same(x) for x in v] if isinstance(v, list) else v

    @field_validator("low", "high", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        return _number_or_same(v)

    @model_validator(mode="after")
    def _check(self) -> "Param":
        if self.type in ("grid", "choice"):
            if not self.values:
                raise ValueError(f"type '{self.type}' needs a non-empty list 'values'")
            if self.low is not None or self.high is not None:
                raise ValueError(f"type '{self.type}' takes 'values', not 'low'/'high'")
            return self
        if self.values is not None:
            raise ValueError(f"type '{self.type}' takes 'low' and 'high', not 'values'")
        if self.low is None or self.high is None:
            raise ValueError(f"type '{self.type}' needs both 'low' and 'high'")
        if self.type == "randint":
            if self.low != int(self.low) or self.high != int(self.high):
                raise ValueError(f"type 'randint' needs integer 'low' and 'high', got {self.low}, {self.high}")
            if self.low > self.high:
                raise ValueError(f"'low' ({self.low:g}) must not exceed 'high' ({self.high:g})")
        elif not self.low < self.high:
            raise ValueError(f"'low' ({self.low:g}) must be below 'high' ({self.high:g})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"type 'loguniform' needs 'low' > 0, got {self.low:g}")
        return self

    @property
    def grid_size(self) -> int:
        return len(self.values or []) if self.type == "grid" else 1

    def check_values(self) -> list[Any]:
        """Values used to check the space against the base config."""
        if self.type in ("grid", "choice"):
            return list(self.values or [])
        if self.type == "randint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def to_tune(self):
        from ray import tune

        if self.type == "grid":
            return tune.grid_search(list(self.values or []))
        if self.type == "choice":
            return tune.choice(list(self.values or []))
        if self.type == "loguniform":
            return tune.loguniform(float(self.low), float(self.high))
        if self.type == "uniform":
            return tune.uniform(float(self.low), float(self.high))
        return tune.randint(int(self.low), int(self.high) + 1)  # Ray's upper bound is exclusive


SCORE_KEY = "sweep_score"
_TIE_WEIGHT = 1e-6  # below the smallest step of any metric worth tuning on


def score(row: dict, metric: str, mode: str, tie: "TieBreaker | None") -> float | None:
    """What the scheduler ranks: ``metric``, plus the tie-breaker squashed into (0, 1e-6)
    with the sign that makes a better tie-breaker a better score (only ever decides ties)."""
    v = row.get(metric)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    if tie is None:
        return float(v)
    t = row.get(tie.metric)
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        return float(v)
    squash = 0.5 + math.atan(t) / math.pi  # increasing, in (0, 1)
    return float(v) + (1 if tie.mode == mode else -1) * _TIE_WEIGHT * squash


OPTUNA_KEYS = ("sampler", "n_startup_trials", "storage", "path", "study_name")


class Search(_Strict):
    """How a sweep draws its trials' hyper-parameters (``search:`` in a spec)."""

    algorithm: Literal["random", "optuna"] = "random"
    sampler: Optional[Literal["tpe"]] = None  # optuna only; tpe when not given
    n_startup_trials: Optional[int] = Field(None, ge=1)  # optuna: random draws before TPE models (default 10)
    storage: Optional[Literal["memory", "journal"]] = None  # optuna: where the study lives (default memory)
    path: Optional[str] = None  # journal: the study's journal file
    study_name: Optional[str] = None  # journal: the study in that file (default: the spec's file name)

    @model_validator(mode="after")
    def _check(self) -> "Search":
        given = [k for k in OPTUNA_KEYS if getattr(self, k) is not None]
        if self.algorithm == "random" and given:
            raise ValueError(f"{given} are options of algorithm: optuna (the random search takes none)")
        if self.storage == "journal" and not self.path:
            raise ValueError("storage: journal needs 'path', the journal file the study is kept in")
        if self.storage != "journal" and (self.path or self.study_name):
            raise ValueError("'path' and 'study_name' name a shared study: they go with storage: journal")
        return self

    @property
    def model_based(self) -> bool:
        return self.algorithm == "optuna"


class SweepSpec(_Strict):
    base: str
    metric: str
    mode: Literal["max", "min"]
    scheduler: Literal["asha", "fifo"] = "asha"
    max_t: int = Field(ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    num_samples: int = Field(1, ge=1)
    resources_per_trial: dict[str, float] = Field(default_factory=lambda: {"cpu": 1.0})
    max_concurrent: int = Field(0, ge=0)  # 0: as many trials as the cluster's resources allow
    space: dict[str, Param]
    overrides: Union[list[str], dict[str, Any]] = Field(default_factory=list)
    seed: int = 0
    tie_breaker: Optional[TieBreaker] = None
    search: Optional[Search] = None  # None: Ray's random/grid variant generator

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not (v.startswith("val.") or v.startswith("train.")):
            raise ValueError(
                f"must be a per-epoch metric starting with 'val.' or 'train.' "
                f"(e.g. val.accuracy, val.auc, val.loss), got {v!r}"
            )
        return v

    @field_validator("resources_per_trial")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        if any(x < 0 for x in v.values()):
            raise ValueError(f"amounts must be >= 0, got {v}")
        if v.get("cpu", 0) <= 0 and v.get("gpu", 0) <= 0:
            raise ValueError(f"a trial needs some cpu or gpu, got {v}")
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, Param]) -> dict[str, Param]:
        if not v:
            raise ValueError("needs at least one hyper-parameter")
        owned = [k for k in v if k in SWEEP_OWNED]
        if owned:
            raise ValueError(
                f"{owned} are set by the sweep itself (max_t and the shared cohort); remove them from the space"
            )
        return v

    @field_validator("overrides", mode="before")
    @classmethod
    def _overrides(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, list):
            bad = [o for o in v if not isinstance(o, str) or "=" not in o or o.startswith("=")]
            if bad:
                raise ValueError(f"each override must be a string 'dotted.key=value', got {bad}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period ({self.grace_period}) exceeds max_t ({self.max_t})")
        grids = [k for k, p in self.space.items() if p.type == "grid"]
        if self.model_based and grids:
            raise ValueError(
                f"search: optuna draws every trial from the space, and a grid ({', '.join(grids)}) is every "
                f"value once: give those keys type: choice, or search: {{algorithm: random}}"
            )
        return self

    @property
    def model_based(self) -> bool:
        """Trials drawn by Optuna from the results so far (not by Ray's random/grid generator)."""
        return self.search is not None and self.search.model_based

    @property
    def search_name(self) -> str:
        """The search algorithm in words, for summaries: ``random`` or ``optuna-tpe``."""
        return f"optuna-{self.search.sampler or 'tpe'}" if self.model_based else "random"

    @property
    def scheduler_metric(self) -> str:
        """The key the scheduler ranks trials by (``metric`` itself without a tie-breaker)."""
        return SCORE_KEY if self.tie_breaker else self.metric

    @property
    def grid_size(self) -> int:
        return math.prod(p.grid_size for p in self.space.values())

    @property
    def num_trials(self) -> int:
        return self.num_samples * self.grid_size

    def param_space(self) -> dict[str, Any]:
        return {k: p.to_tune() for k, p in self.space.items()}


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, dict):
            out |= _flat_keys(v, key + ".")
    return out


def _resolve_base(base: str, spec_path: Path | None) -> Path:
    """The base config: a packaged name (``emt``), else as given (absolute or from the current
    directory), else next to the spec, else one folder up from it (``tune/x.yaml`` or a
    packaged ``sweeps/x.yaml`` naming ``configs/y.yaml``)."""
    if resources.is_name(base):
        return resources.config_path(base)
    p = Path(base)
    if p.is_absolute() or p.exists() or spec_path is None:
        return p
    for root in (spec_path.parent, spec_path.parent.parent):
        if (root / p).exists():
            return root / p
    return p


@dataclass
class Sweep:
    """A checked spec plus its base config (spec and command-line overrides applied)."""

    spec: SweepSpec
    source: str  # the spec file (or "<spec>")
    base_path: Path
    base_data: dict  # the base config as a plain dict, overrides applied, not yet validated for trials

    @property
    def task(self) -> str:
        return self.base_data["task"]

    def trial_data(
        self,
        params: dict[str, Any],
        *,
        cohort: str | None = None,
        threads: int | None = None,
        tracking_off: bool = True,
    ) -> dict:
        """The experiment dict of one trial: base + sampled params + what the sweep owns."""
        data = copy.deepcopy(self.base_data)
        for k, v in params.items():
            set_dotted(data, k, v)
        set_dotted(data, "train.max_epochs", self.spec.max_t)
        if cohort is not None:
            set_dotted(data, "data.cohort", cohort)
        if threads is not None and not data.get("train", {}).get("num_threads"):
            set_dotted(data, "train.num_threads", threads)
        if tracking_off:  # W&B and MLflow are logged by the driver (trd_hpc.tune.tracking)
            set_dotted(data, "tracking.wandb", False)
            set_dotted(data, "tracking.mlflow", False)
        return data

    def check_space(self) -> None:
        valid = _flat_keys(to_dict(validate_experiment(copy.deepcopy(self.base_data), str(self.base_path))))
        for key in self.spec.space:
            if key not in valid:
                parent = key.rsplit(".", 1)[0] if "." in key else ""
                while parent and parent not in valid:  # the deepest part of the key that exists
                    parent = parent.rsplit(".", 1)[0] if "." in parent else ""
                here = sorted(
                    k[len(parent) + 1 if parent else 0 :]
                    for k in valid
                    if (k.rsplit(".", 1)[0] if "." in k else "") == parent
                )
                where = f"under '{parent}'" if parent else "at the top level"
                raise ConfigError(
                    f"{self.source}: space key '{key}' is not a key of the base config {self.base_path}; "
                    f"valid keys {where}: {', '.join(here)}"
                )
        names = list(self.spec.space)
        discrete = [n for n in names if self.spec.space[n].type in ("grid", "choice")]
        continuous = [n for n in names if n not in discrete]
        combos = itertools.product(*(self.spec.space[n].check_values() for n in discrete))
        for combo in itertools.islice(combos, MAX_CHECKED_COMBINATIONS):
            for end in (0, 1) if continuous else (0,):
                params = dict(zip(discrete, combo))
                params.update({n: self.spec.space[n].check_values()[end] for n in continuous})
                try:
                    validate_experiment(self.trial_data(params), f"{self.source} trial {params}")
                except ConfigError as e:
                    raise ConfigError(f"{self.source}: the space gives an invalid config for {params}:\n{e}") from None

    def fingerprint(self, cohort: str) -> dict:
        """What must not change between a sweep and its resumption."""
        # without a search section the spec dumps as before there was one: older sweeps still resume
        exclude = {"base"} | ({"search"} if self.spec.search is None else set())
        return {
            "spec": self.spec.model_dump(mode="json", exclude=exclude),  # the base by content:
            "base": self.trial_data({}, cohort=cohort, tracking_off=False),
        }


def load_spec(
    path: str | Path | None = None,
    *,
    data: dict | None = None,
    base: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    updates: dict | None = None,
) -> Sweep:
    """Read and check a spec file (or a dict).  ``base`` replaces the spec's base config,
    ``overrides`` (dotted key=value) apply to the base after the spec's own, ``updates``
    replace top-level spec fields (e.g. ``{"scheduler": "fifo", "max_t": 4}``)."""
    spec_path = resources.sweep_path(path) if path is not None else None
    source = str(spec_path) if spec_path else "<spec>"
    if data is None:
        if spec_path is None:
            raise ConfigError("sweep spec not found: no path given")
        data = _read_yaml(spec_path, "sweep spec")
    data = dict(data)
    if base is not None:
        data["base"] = str(base)
    data.update({k: v for k, v in (updates or {}).items() if v is not None})
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, SweepSpec, source, "sweep spec")) from None
    base_path = _resolve_base(spec.base, spec_path)
    if not base_path.is_file():
        raise ConfigError(f"{source}: key 'base': config file not found: {spec.base}")
    base_data = _read_config_file(base_path)
    if isinstance(spec.overrides, dict):
        for k, v in spec.overrides.items():
            set_dotted(base_data, k, v)
        base_data = merge_overrides(base_data, [], str(base_path))
    else:
        base_data = merge_overrides(base_data, list(spec.overrides), f"{base_path} (spec overrides)")
    base_data = merge_overrides(base_data, list(overrides), f"{base_path} (command-line overrides)")
    try:
        validate_experiment(copy.deepcopy(base_data), f"{base_path} with the spec's overrides")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    sweep = Sweep(spec=spec, source=source, base_path=base_path, base_data=base_data)
    sweep.check_space()
    return sweep


def dumps(obj: Any) -> str:
    """JSON with NaN/inf written as null."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=1)
