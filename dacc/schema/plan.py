"""The plan file (`plan.yaml`): what the user asks the compiler to do.

The schema is strict (unknown keys are errors) and every error names the file, the key
and the allowed values. Later capabilities extend these sections; they never rename them.
Values that are spelled here but not yet implemented are rejected by validation with the
list of what is available, so a plan never silently means less than it says.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dacc.schema.errors import DaccError

CACHE_STRATEGIES = ("none", "dbcache", "teacache", "taylorseer", "scm")
SCM_POLICIES = ("slow", "medium", "fast", "ultra")
QUANTIZE_MODES = ("none",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CachePlan(_Strict):
    strategy: Literal[CACHE_STRATEGIES] = "none"  # type: ignore[valid-type]
    cache_ratio: float = Field(0.0, ge=0.0, le=1.0)
    warmup: int = Field(0, ge=0)
    cooldown: int = Field(0, ge=0)
    target_psnr: float | None = Field(None, gt=0.0)
    options: dict[str, Any] = Field(default_factory=dict)


class _StepMaskOptions(_Strict):
    """SCM combines with every strategy: masked steps skip, unmasked steps run the dynamic gate."""
    scm_policy: Literal[SCM_POLICIES] | None = None  # type: ignore[valid-type]
    scm_mask: list[bool] | None = None


class _StepLimits(_Strict):
    max_cached_steps: int = Field(-1, ge=-1)
    max_continuous_cached_steps: int = Field(-1, ge=-1)


class DBCacheOptions(_StepMaskOptions, _StepLimits):
    Fn: int = Field(1, ge=1)
    Bn: int = Field(0, ge=0)
    threshold: float | None = Field(None, ge=0.0)
    taylorseer_order: int = Field(0, ge=0, le=2)


class TeaCacheOptions(_StepMaskOptions, _StepLimits):
    threshold: float | None = Field(None, ge=0.0)
    rescale: list[float] | None = None  # polynomial coefficients; None = calibrate on sample()
    calibration_seeds: int = Field(2, ge=1, le=64)


class TaylorSeerOptions(_StepMaskOptions, _StepLimits):
    order: int = Field(1, ge=1, le=2)
    interval: int | None = Field(None, ge=1)


class SCMOptions(_StepLimits):
    policy: Literal[SCM_POLICIES] | None = None  # type: ignore[valid-type]
    mask: list[bool] | None = None
    taylorseer_order: int = Field(0, ge=0, le=2)


CACHE_OPTIONS: dict[str, type[BaseModel]] = {"none": _Strict, "dbcache": DBCacheOptions,
                                             "teacache": TeaCacheOptions, "taylorseer": TaylorSeerOptions,
                                             "scm": SCMOptions}


def cache_options(plan: "Plan") -> BaseModel:
    """The validated options of the plan's cache strategy."""
    return CACHE_OPTIONS[plan.cache.strategy].model_validate(plan.cache.options)


class ParallelPlan(_Strict):
    # Degrees multiply to the world size; only 1 is available until parallelism lands.
    cfg: Literal[1] = 1
    ulysses: Literal[1] = 1
    ring: Literal[1] = 1
    fsdp: Literal[1] = 1
    vae_patch: Literal[1] = 1


class QuantizePlan(_Strict):
    mode: Literal[QUANTIZE_MODES] = "none"  # type: ignore[valid-type]
    exclude: list[str] = Field(default_factory=list)


class Plan(_Strict):
    num_inference_steps: int = Field(50, ge=1, le=10_000)
    cache: CachePlan = Field(default_factory=CachePlan)
    parallel: ParallelPlan = Field(default_factory=ParallelPlan)
    quantize: QuantizePlan = Field(default_factory=QuantizePlan)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at `loc` (the parent of the offending key)."""
    for key in loc:
        field = model.model_fields.get(str(key))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(err: dict, source: str, prefix: tuple = (), model: type[BaseModel] | None = None) -> str:
    loc = prefix + tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        allowed = list(model.model_fields) if model is not None else _allowed_keys(Plan, loc[:-1])
        lowered = {a.lower(): a for a in allowed}
        close = difflib.get_close_matches(str(loc[-1]).lower(), list(lowered), n=1)
        hint = f" (did you mean '{lowered[close[0]]}'?)" if close else ""
        return f"{source}: unknown key '{key}'{hint}; allowed keys here: {', '.join(allowed) or '(none)'}"
    if err["type"] == "literal_error":
        return f"{source}: key '{key}' = {err.get('input')!r} is not allowed; {err['msg'].lower()}"
    return f"{source}: key '{key}': {err['msg']} (got {err.get('input')!r})"


def parse_plan(data: Any, source: str = "<plan>") -> Plan:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DaccError(f"the plan must be a mapping of sections, got {type(data).__name__}", source,
                        "write keys such as 'num_inference_steps:' and 'cache:' at the top level")
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise DaccError("invalid plan: " + "; ".join(lines), source,
                        "correct the key(s) above; see README.md 'Plan file' for every key") from None
    c = plan.cache
    try:
        cache_options(plan)
    except ValidationError as exc:
        model = CACHE_OPTIONS[c.strategy]
        lines = [_describe(e, source, ("cache", "options"), model) for e in exc.errors()]
        raise DaccError(f"invalid options for cache strategy '{c.strategy}': " + "; ".join(lines), source,
                        "see README.md 'Cache strategies' for each strategy's options") from None
    if c.warmup + c.cooldown > plan.num_inference_steps:
        raise DaccError(f"cache.warmup ({c.warmup}) + cache.cooldown ({c.cooldown}) exceed "
                        f"num_inference_steps ({plan.num_inference_steps})", source,
                        "lower warmup/cooldown or raise num_inference_steps")
    return plan


def load_plan(path: str | Path | None) -> Plan:
    """Read and validate a plan file; `None` gives the empty (default) plan."""
    if path is None:
        return Plan()
    path = Path(path)
    if not path.is_file():
        raise DaccError(f"plan file '{path}' does not exist", str(path), "pass an existing YAML file to --plan")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise DaccError(f"plan file is not valid YAML ({getattr(exc, 'problem', exc)})", where,
                        "fix the YAML syntax at that line") from None
    return parse_plan(data, str(path))
