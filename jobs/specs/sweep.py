"""SweepSpec: a typed, bounded spec for one hyperparameter sweep (``python -m jobs.sweep --spec FILE``).

A sweep is a base train spec, a search space over its fields (``train.lr``, ``model.n_routed_experts``,
...), a search algorithm, a trial scheduler, the metric and how many trials run, and at once. Every
trial is a real distributed training run of the base spec with the trial's values set.

Validated before any Ray work starts, with the train spec's own rules: each path must name a field of
TrainSpec, and the base spec must still validate with every bound of its dimension substituted (a
choice's values, a range's ends), so a range that Ray Tune would only sample into an invalid spec
halfway through the sweep is refused up front, naming the path. Torch-free: the control plane imports it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from jobs.specs.base import SpecError, field_errors, read_yaml, spec_name, validate_as
from jobs.specs.train import TrainSpec
from workers.config import Config

# Trials of a random (or model-based) search when ``trials`` is not given.
DEFAULT_TRIALS = 8
# Searches that choose each trial's values from the results so far (Tree-structured Parzen
# Estimators): they need a trial budget and cannot run under PBT, which chooses the values itself.
MODEL_BASED_SEARCHES = ("optuna", "hyperopt")
# The largest grid a spec may expand to, and the most values one choice may list.
MAX_TRIALS = 10_000
MAX_CHOICES = 256
# Sections a trial may not change, and why. (data.seq_len only changes how the shared shards are
# packed, so it may vary.)
FIXED_PATHS = {
    "name": "the run's name is the sweep's",
    "resources": "each trial's workers come from workers_per_trial",
    "data": "the driver prepares one corpus for every trial",
    "checkpoint_storage": "trials keep their checkpoints in the sweep's output folder (OUT/trials/<id>)",
}
VARIABLE_DATA_FIELDS = ("data.seq_len",)
# Fields PBT may mutate mid-run: a trial then continues from another trial's checkpoint, so its
# parameter and optimizer shapes must not depend on the field.
PBT_MUTABLE = frozenset({
    "train.lr", "train.min_lr_ratio", "train.weight_decay", "train.grad_clip",
    "compression.density", "compression.clip_norm",
    "model.bias_update_rate", "model.aux_loss_coef", "model.capacity_factor",
})

Scalar = Union[bool, int, float, str]  # noqa: UP007  (pydantic tries the members in order)


class Choice(Config):
    type: Literal["choice"] = "choice"
    values: list[Scalar] = Field(min_length=1, max_length=MAX_CHOICES)

    def bounds(self) -> list[Any]:
        return list(self.values)


class Uniform(Config):
    type: Literal["uniform"] = "uniform"
    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self

    def bounds(self) -> list[Any]:
        return [self.low, self.high]


class LogUniform(Uniform):
    type: Literal["loguniform"] = "loguniform"  # type: ignore[assignment]
    low: float = Field(gt=0.0, allow_inf_nan=False)


class RandInt(Config):
    type: Literal["randint"] = "randint"
    low: int
    high: int  # inclusive

    @model_validator(mode="after")
    def _ordered(self) -> RandInt:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self

    def bounds(self) -> list[Any]:
        return [self.low, self.high]


Dimension = Annotated[Union[Choice, Uniform, LogUniform, RandInt], Field(discriminator="type")]  # noqa: UP007
SpacePath = Annotated[str, Field(pattern=r"^[a-z_]+(\.[a-z_]+)*$", max_length=128)]


class FifoScheduler(Config):
    """Every trial runs all its steps."""

    type: Literal["fifo"] = "fifo"


class AshaScheduler(Config):
    """Asynchronous successive halving: at each rung (grace_period * reduction_factor**k steps) a
    trial continues only if its metric is in the best 1/reduction_factor of the trials seen there."""

    type: Literal["asha"] = "asha"
    grace_period: int = Field(10, ge=1, le=10_000_000)  # steps before a trial may be stopped
    reduction_factor: float = Field(2.0, gt=1.0, le=64.0)


class PbtScheduler(Config):
    """Population-based training: every perturbation_interval steps the worst quantile of trials
    continues from a top trial's checkpoint with perturbed (or resampled) values."""

    type: Literal["pbt"] = "pbt"
    perturbation_interval: int = Field(20, ge=1, le=10_000_000)  # steps; a multiple of report_every
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)
    resample_probability: float = Field(0.25, ge=0.0, le=1.0)


Scheduler = Annotated[Union[FifoScheduler, AshaScheduler, PbtScheduler], Field(discriminator="type")]  # noqa: UP007


def _set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b.c`` in a spec mapping (sections created as needed)."""
    *sections, leaf = path.split(".")
    node = raw
    for part in sections:
        node = node.setdefault(part, {})
    node[leaf] = value


def _field_annotation(path: str) -> Any:
    """The annotation of TrainSpec's field at ``path``; ValueError naming the first unknown part."""
    model: Any = TrainSpec
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ValueError(f"{'.'.join(parts[:i])} is not a section of the train spec")
        field = model.model_fields.get(part)
        if field is None:
            where = ".".join(parts[:i]) or "the train spec"
            raise ValueError(f"{'.'.join(parts[: i + 1])} is not a field of {where} "
                             f"(fields: {', '.join(model.model_fields)})")
        model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        raise ValueError(f"{path} is a section; name one of its fields")
    return model


def _is_int_field(annotation: Any) -> bool:
    members = get_args(annotation) or (annotation,)
    return int in members and float not in members


def _check_dimension(path: str, dim: Any, make: Any) -> None:
    """``path`` names a field a sweep may vary, and ``make`` (params -> TrainSpec) accepts every bound."""
    try:
        annotation = _field_annotation(path)
    except ValueError as e:
        raise ValueError(f"space.{path}: {e}") from None
    section = path.split(".")[0]
    if section in FIXED_PATHS and path not in VARIABLE_DATA_FIELDS:
        raise ValueError(f"space.{path}: a sweep may not vary {section} ({FIXED_PATHS[section]})")
    if isinstance(dim, Uniform) and _is_int_field(annotation):
        raise ValueError(f"space.{path}: an integer field; use randint or choice, not {dim.type}")
    for value in dim.bounds():
        try:
            make({path: value})
        except SpecError as e:
            raise ValueError(f"space.{path}: the value {value!r} makes the train spec invalid: {e}") from None


def trial_spec(base: TrainSpec, workers: int, report_every: int, params: dict[str, Any]) -> TrainSpec:
    """The train spec of one trial: ``base`` with the sweep's workers per trial and report interval
    and the trial's values set. SpecError naming the fields it breaks."""
    raw = copy.deepcopy(base.model_dump(mode="json"))
    _set_path(raw, "resources.num_workers", workers)
    _set_path(raw, "train.checkpoint_every", report_every)
    for path, value in params.items():
        _set_path(raw, path, value)
    try:
        return TrainSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError("; ".join(field_errors(e.errors()))) from None


class SweepSpec(Config):
    name: str = spec_name("sweep")
    # loss: the training loss at each report (the last report: the mean over the run's final window);
    # eval_loss: the held-out loss, known only when a trial ends (so only the fifo scheduler can use it).
    metric: Literal["loss", "eval_loss"] = "loss"
    mode: Literal["min", "max"] = "min"
    # None: the grid's size (search grid) or DEFAULT_TRIALS.
    trials: int | None = Field(None, ge=1, le=MAX_TRIALS)
    max_concurrent: int = Field(2, ge=1, le=1024)
    # Workers of every trial; replaces base.resources.num_workers. One: the trial trains in its Tune
    # actor (trials_in_actor); more: each trial is a Ray Train run of that many workers.
    workers_per_trial: int = Field(1, ge=1, le=4096)
    # Steps between two reports of a trial: each is a checkpoint, a point of its curve and a moment
    # the scheduler may stop it. Replaces base.train.checkpoint_every.
    report_every: int = Field(10, ge=1, le=10_000_000)
    # random: Tune's random sampling; grid: every combination of the choice dimensions (every
    # dimension must be a choice); optuna: Optuna's TPE sampler; hyperopt: HyperOpt's TPE.
    search: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    scheduler: Scheduler = FifoScheduler()
    base: TrainSpec  # before space: space's validator reads it
    # Spec field path -> its dimension; each bound must make a valid trial spec.
    space: dict[SpacePath, Dimension] = Field(min_length=1, max_length=64)

    @field_validator("base")
    @classmethod
    def _check_base(cls, base: TrainSpec, info: ValidationInfo) -> TrainSpec:
        """The base as every trial runs it (with workers_per_trial and report_every)."""
        if base.checkpoint_storage is not None:
            raise ValueError(f"checkpoint_storage: {FIXED_PATHS['checkpoint_storage']}; leave it unset")
        if {"workers_per_trial", "report_every"} <= info.data.keys():
            trial_spec(base, info.data["workers_per_trial"], info.data["report_every"], {})
        return base

    @field_validator("space")
    @classmethod
    def _check_space(cls, space: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if {"base", "workers_per_trial", "report_every"} <= info.data.keys():
            for path, dim in space.items():
                _check_dimension(path, dim, lambda params: trial_spec(
                    info.data["base"], info.data["workers_per_trial"], info.data["report_every"], params))
        return space

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        steps = self.base.train.steps
        sched = self.scheduler
        if self.metric == "eval_loss" and sched.type != "fifo":
            raise ValueError(f"metric eval_loss is known only when a trial ends; scheduler {sched.type} needs a "
                             "metric at every report (use metric loss)")
        if isinstance(sched, AshaScheduler) and sched.grace_period > steps:
            raise ValueError(f"scheduler.grace_period ({sched.grace_period}) must be <= base.train.steps ({steps})")
        if isinstance(sched, PbtScheduler):
            if self.search in MODEL_BASED_SEARCHES:
                raise ValueError(f"search {self.search} chooses each trial's values from the results so far, "
                                 "and PBT mutates them itself (Ray Tune refuses the pair): use search random "
                                 "or grid with PBT")
            if sched.perturbation_interval % self.report_every or sched.perturbation_interval >= steps:
                raise ValueError(f"scheduler.perturbation_interval ({sched.perturbation_interval}) must be a "
                                 f"multiple of report_every ({self.report_every}) and < base.train.steps ({steps})")
            for path in self.space:
                if path not in PBT_MUTABLE:
                    raise ValueError(f"space.{path}: PBT continues trials from other trials' checkpoints, so it "
                                     f"may only mutate fields that keep parameter shapes ({', '.join(sorted(PBT_MUTABLE))})")
        if self.search == "grid":
            if any(not isinstance(d, Choice) for d in self.space.values()):
                bad = next(p for p, d in self.space.items() if not isinstance(d, Choice))
                raise ValueError(f"space.{bad}: a grid search needs every dimension to be a choice")
            if self.grid_size > MAX_TRIALS:
                raise ValueError(f"space: the grid expands to {self.grid_size} trials, more than the limit of "
                                 f"{MAX_TRIALS}; list fewer values, or use search random with a trials budget")
            if self.trials is not None and self.trials != self.grid_size:
                raise ValueError(f"trials ({self.trials}) must be the grid's size ({self.grid_size}) or unset")
        return self

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.space.values() if isinstance(d, Choice))

    @property
    def n_trials(self) -> int:
        if self.search == "grid":
            return self.grid_size
        return self.trials or DEFAULT_TRIALS

    def trial_spec(self, params: dict[str, Any]) -> TrainSpec:
        """The train spec of the trial with ``params`` (module function ``trial_spec``)."""
        return trial_spec(self.base, self.workers_per_trial, self.report_every, params)

    @property
    def trials_in_actor(self) -> bool:
        """A trial of one worker runs its training loop in its own Tune actor (jobs/runtime/sweep_trial.py),
        with no Ray Train run to start; more workers, workers from pools, or PBT's segments (each a
        run from a checkpoint Tune hands over) make each trial a Train run."""
        return (self.workers_per_trial == 1 and self.base.resources.pools is None
                and not isinstance(self.scheduler, PbtScheduler))


def validate_sweep_spec(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    return validate_as(SweepSpec, raw, overrides, "sweep")


def load_sweep_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    return validate_sweep_spec(read_yaml(path), overrides)
