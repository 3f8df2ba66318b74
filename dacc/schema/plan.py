"""The plan file (`plan.yaml`): what the user asks the compiler to do.

The schema is strict (unknown keys are errors, a bool is not a number, a number is not a string;
an integer is accepted where a number is) and every error names the file, the key (with its line
when read from a file) and the allowed values. Settings that cannot both take effect are
conflicts (plan_checks.py); the YAML itself is read with size, depth, alias and duplicate-key
limits (plan_yaml.py). Later capabilities extend these sections; they never rename them.
Values that are spelled here but not yet implemented are rejected by validation with the
list of what is available, so a plan never silently means less than it says.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dacc.schema.errors import DaccError
from dacc.schema.plan_checks import Lines, conflicts, describe_all, where
from dacc.schema.plan_yaml import read_plan_data

CACHE_STRATEGIES = ("none", "dbcache", "teacache", "taylorseer", "scm", "schedule", "magcache")
SCM_POLICIES = ("slow", "medium", "fast", "ultra")
QUANTIZE_MODES = ("none", "int8_weight", "int8_dynamic", "fp8_dynamic", "int4_weight")
# where quantize.smoothing applies: integer activations, whose one scale per token a few outlier
# channels starve (fp8's floating point keeps its relative precision; measured, no gain)
SMOOTHABLE_MODES = ("int8_dynamic",)
DYNAMIC_MODES = ("int8_dynamic", "fp8_dynamic")  # the modes that quantize activations too
FRAGILE_MODES = ("int8_weight", "full", "same")  # what the fragile layers get instead of quantize.mode
OVERRIDE_MODES = QUANTIZE_MODES[1:] + ("full",)  # what quantize.overrides may give a linear


class _Strict(BaseModel):
    # strict: no coercion (True is not 1, "5" is not 5; an int is still a valid float); finite numbers only
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class CachePlan(_Strict):
    strategy: Literal[CACHE_STRATEGIES] = "none"  # type: ignore[valid-type]
    cache_ratio: float = Field(0.0, ge=0.0, le=1.0)
    warmup: int = Field(0, ge=0)
    cooldown: int = Field(0, ge=0)
    target_psnr: float | None = Field(None, gt=0.0, le=100.0)  # dB; search_seeds.PSNR_CAP: identical is 100
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
    # polynomial coefficients, highest degree first; None = calibrate on sample()
    rescale: list[float] | None = Field(None, min_length=1, max_length=16)
    calibration_seeds: int = Field(2, ge=1, le=64)


class TaylorSeerOptions(_StepMaskOptions, _StepLimits):
    order: int = Field(1, ge=1, le=2)
    interval: int | None = Field(None, ge=1)


class SCMOptions(_StepLimits):
    policy: Literal[SCM_POLICIES] | None = None  # type: ignore[valid-type]
    mask: list[bool] | None = None
    taylorseer_order: int = Field(0, ge=0, le=2)


class ScheduleOptions(_StepLimits):
    """The step mask is chosen at compile time from costs measured on sample() (dacc/compiler/schedule.py)."""
    taylorseer_order: int = Field(0, ge=0, le=2)  # skipped steps forecast the residual instead of reusing it
    # contiguous block ranges, each with its own step mask (a step x range schedule); 1 masks all blocks at once
    ranges: int = Field(1, ge=1, le=8)
    # one step mask per range, fixed (what `dacc calibrate` prints); None: chosen by calibration
    masks: list[list[bool]] | None = None


class MagCacheOptions(_StepLimits):
    """MagCache's rule on a magnitude-ratio curve measured on sample() (dacc/compiler/magcache.py);
    max_continuous_cached_steps is its K, cache.warmup its retention."""
    threshold: float | None = Field(None, ge=0.0)  # accumulated error; None: from cache_ratio
    taylorseer_order: int = Field(0, ge=0, le=2)


THRESHOLD_STRATEGIES = ("dbcache", "teacache", "magcache")  # whose gate compares an error with `threshold`
CACHE_OPTIONS: dict[str, type[BaseModel]] = {"none": _Strict, "dbcache": DBCacheOptions,
                                             "teacache": TeaCacheOptions, "taylorseer": TaylorSeerOptions,
                                             "scm": SCMOptions, "schedule": ScheduleOptions,
                                             "magcache": MagCacheOptions}


def cache_options(plan: "Plan") -> BaseModel:
    """The validated options of the plan's cache strategy (parse_plan has checked them)."""
    return CACHE_OPTIONS[plan.cache.strategy].model_validate(plan.cache.options)


class AutoParallel(_Strict):
    # the compiler tries every split of world_size into degrees, predicts each one's step time and
    # memory on `device` at sizes `at` (default: the example's), and compiles the fastest that fits
    # (dacc/compiler/choose_parallel.py); `dacc inspect` shows every candidate and why it lost
    world_size: int = Field(ge=1, le=64)
    device: str = "h100-sxm"  # a built-in profile (dacc/cost/devices.py) or a `dacc profile-device` file
    at: dict[str, int] = Field(default_factory=dict)  # symbol -> size, e.g. {s1: 4096}
    # latency: the time of one call (fsdp ranks then only save memory: each serves its own call);
    # throughput: that time over the calls served at once (the fsdp degree)
    objective: Literal["latency", "throughput"] = "latency"


class ParallelPlan(_Strict):
    # Degrees multiply to the world size the artifact runs on (torchrun --nproc_per_node).
    # cfg: the two halves of a batched-CFG call on two ranks; ulysses: tokens sharded, heads
    # exchanged at each attention site; ring: tokens sharded, keys and values passed around a ring;
    # both: USP, tokens over ulysses x ring (dacc/passes/split_cfg.py, partition_attention.py);
    # fsdp: parameters sharded over P data-parallel ranks, gathered per block (annotate_fsdp_units.py).
    # vae_patch: a VAE decoder's rows split in bands over P ranks, halos exchanged
    # (partition_patches.py); for a decoder model file, alone.
    cfg: Literal[1, 2] = 1
    ulysses: int = Field(1, ge=1, le=64)
    ring: int = Field(1, ge=1, le=64)
    fsdp: int = Field(1, ge=1, le=64)
    vae_patch: int = Field(1, ge=1, le=64)
    auto: AutoParallel | None = None  # choose the degrees above instead of giving them

    @property
    def world_size(self) -> int:
        if self.auto is not None:
            return self.auto.world_size
        return self.cfg * self.ulysses * self.ring * self.fsdp * self.vae_patch


class QuantizePlan(_Strict):
    mode: Literal[QUANTIZE_MODES] = "none"  # type: ignore[valid-type]
    exclude: list[str] = Field(default_factory=list)  # glob patterns on linear module paths
    # embedders and the final projection (and, where activations are quantized, adaptive-norm
    # modulation): weight-only int8 (activations untouched), full precision, or the plan's mode
    fragile: Literal[FRAGILE_MODES] = "int8_weight"  # type: ignore[valid-type]
    # per-linear modes ahead of exclude's neighbours `fragile` and `mode`: {glob pattern on module
    # paths: mode}, the first matching pattern wins; "full" keeps full precision. The quantize
    # search promotes the linears of the blocks it keeps through the same mechanism
    overrides: dict[str, Literal[OVERRIDE_MODES]] = Field(default_factory=dict)  # type: ignore[valid-type]
    group_size: Literal[32, 64, 128] = 64  # int4_weight: input weights per scale
    # keep the most sensitive blocks in full precision until sample()'s PSNR against the float
    # model holds on validation seeds (dacc/compiler/quant_search.py)
    target_psnr: float | None = Field(None, gt=0, le=100)
    # int8_dynamic: SmoothQuant strength alpha; per-input-channel factors measured on
    # sample() move activation outliers into the weights (dacc/compiler/smoothing.py); 0: off
    smoothing: float = Field(0.0, ge=0, le=1)
    # int4_weight: how weights meet their levels. gptq spreads each rounding error over the inputs
    # not yet rounded, weighted by their correlation on sample() (dacc/compiler/gptq.py); auto is
    # gptq where the model file has sample(), nearest where it has not
    rounding: Literal["auto", "nearest", "gptq"] = "auto"


class LowerPlan(_Strict):
    # inductor: every segment becomes an AOTInductor package (C++/OpenMP on cpu, Triton on cuda)
    # built for `device` on the compiling machine and shipped in the artifact
    backend: Literal["none", "inductor"] = "none"
    device: Literal["cpu", "cuda"] = "cpu"


class Plan(_Strict):
    num_inference_steps: int = Field(50, ge=1, le=10_000)
    cache: CachePlan = Field(default_factory=CachePlan)
    parallel: ParallelPlan = Field(default_factory=ParallelPlan)
    quantize: QuantizePlan = Field(default_factory=QuantizePlan)
    lower: LowerPlan = Field(default_factory=LowerPlan)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _invalid(errors: list[dict], what: str, root: type[BaseModel], prefix: tuple, lines: Lines | None,
             source: str, fix: str) -> DaccError:
    text, at = describe_all(errors, root, prefix, lines, source)
    return DaccError(f"{what}: {text}", at, fix)


def parse_plan(data: Any, source: str = "<plan>", lines: Lines | None = None) -> Plan:
    """Validate plan data (from `plan_yaml` or built in Python); `lines` maps key paths to lines."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DaccError(f"the plan must be a mapping of sections, got {type(data).__name__}", source,
                        "write keys such as 'num_inference_steps:' and 'cache:' at the top level")
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc.errors(), "invalid plan", Plan, (), lines, source,
                       "correct the key(s) above; see README.md 'Plan file' for every key") from None
    c = plan.cache
    model = CACHE_OPTIONS[c.strategy]
    try:
        options = model.model_validate(c.options)
    except ValidationError as exc:
        raise _invalid(exc.errors(), f"invalid options for cache strategy '{c.strategy}'", model,
                       ("cache", "options"), lines, source,
                       "see README.md 'Cache strategies' for each strategy's options") from None
    found = conflicts(plan, options)
    if found:
        raise DaccError("conflicting plan settings: " + "; ".join(why for _, why in found),
                        where(source, lines, found[0][0]),
                        "change the settings as each item above says; see README.md 'Plan file'")
    return plan


def load_plan(path: str | Path | None) -> Plan:
    """Read and validate a plan file; `None` gives the empty (default) plan."""
    if path is None:
        return Plan()
    data, lines = read_plan_data(path)
    return parse_plan(data, str(path), lines)
