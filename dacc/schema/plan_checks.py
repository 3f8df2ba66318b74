"""What makes a valid plan beyond field types: the error texts for type errors (file, key, line,
allowed values, fix) and the cross-field conflicts, where two settings cannot both take effect.

A plan that validates means what it says: a knob that would be silently ignored is an error.
Kept apart from plan.py (the schema) so each stays small; it imports the schema only for typing.
"""
from __future__ import annotations

import difflib
import types
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from dacc.schema.errors import short_repr

if TYPE_CHECKING:
    from dacc.schema.plan import Plan

Lines = dict[tuple, int]  # key path -> line in the plan file (from plan_yaml), when read from a file
MAX_LISTED = 5  # errors listed in one message; a hostile file can produce thousands


def where(source: str, lines: Lines | None, loc: tuple) -> str:
    """`file:line` of the deepest key of `loc` whose line is known, else the file."""
    for n in range(len(loc), 0, -1):
        line = (lines or {}).get(tuple(loc[:n]))
        if line is not None:
            return f"{source}:{line}"
    return source


def line_of(lines: Lines | None, loc: tuple) -> str:
    """` (line N)` for the deepest key of `loc` whose line is known, else ''."""
    at = where("", lines, loc)
    return f" (line {at[1:]})" if at else ""


def _part(p: Any) -> str:
    if isinstance(p, bool) or not isinstance(p, (str, int)):
        return short_repr(p, 40)
    text = " ".join(str(p).split())
    return text if len(text) <= 40 else text[:37] + "..."


def key_text(loc: tuple) -> str:
    return ".".join(_part(p) for p in loc) or "<top level>"


def _field(root: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, Any]:
    """(the model holding the last key of `loc`, that key's FieldInfo or None)."""
    model: Any = root
    for i, key in enumerate(loc):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or not isinstance(key, str):
            return None, None
        info = model.model_fields.get(key)
        if info is None or i == len(loc) - 1:
            return model, info
        model = info.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None, None


def _type_text(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [_type_text(a) for a in get_args(tp) if a is not type(None)]
        return " or ".join(inner) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"a list of ({_type_text(get_args(tp)[0])})"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _item(tp: Any) -> Any:
    """The element type of `list[X]` or `list[X] | None`."""
    if get_origin(tp) in (Union, types.UnionType):
        tp = next((a for a in get_args(tp) if a is not type(None)), tp)
    return get_args(tp)[0] if get_origin(tp) is list else tp


def expected(root: type[BaseModel], loc: tuple) -> str:
    """The allowed values of the field at `loc`, or of the items when `loc` ends in list indices."""
    depth = 0
    while loc and not isinstance(loc[-1], str):
        loc, depth = loc[:-1], depth + 1
    _, info = _field(root, loc)
    if info is None:
        return ""
    if depth:
        tp = info.annotation
        for _ in range(depth):
            tp = _item(tp)
        return f"allowed: {_type_text(tp)}"
    bounds = [f"{op} {getattr(m, name)}" for m in info.metadata
              for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"),
                               ("min_length", "length >="), ("max_length", "length <="))
              if getattr(m, name, None) is not None]
    return f"allowed: {_type_text(info.annotation)}" + (f" ({', '.join(bounds)})" if bounds else "")


def describe(err: dict, root: type[BaseModel], prefix: tuple, lines: Lines | None, source: str) -> str:
    """One pydantic error as `key '...' (line N): problem (got ...; allowed values)`."""
    rel = tuple(err["loc"])  # relative to `root`; `prefix` places root in the plan, for display
    loc = prefix + rel
    at, key = line_of(lines, loc), key_text(loc)
    if err["type"] == "extra_forbidden":
        model, _ = _field(root, rel)
        allowed = list(model.model_fields) if model is not None else []
        lowered = {a.lower(): a for a in allowed}
        close = difflib.get_close_matches(str(loc[-1]).lower()[:60], list(lowered), n=1)
        hint = f" (did you mean '{lowered[close[0]]}'?)" if close else ""
        return f"unknown key '{key}'{at}{hint}; allowed keys here: {', '.join(allowed) or '(none)'}"
    got = short_repr(err.get("input"))
    if err["type"] == "literal_error":
        return f"key '{key}'{at} = {got} is not allowed; {err['msg'].lower()}"
    allowed = expected(root, rel)
    return f"key '{key}'{at}: {err['msg']} (got {got}{'; ' + allowed if allowed else ''})"


def describe_all(errors: list[dict], root: type[BaseModel], prefix: tuple, lines: Lines | None,
                 source: str) -> tuple[str, str]:
    """(the errors as one paragraph, the location of the first)."""
    texts = [describe(e, root, prefix, lines, source) for e in errors[:MAX_LISTED]]
    if len(errors) > MAX_LISTED:
        texts.append(f"... and {len(errors) - MAX_LISTED} more")
    return "; ".join(texts), where(source, lines, prefix + tuple(errors[0]["loc"]) if errors else prefix)


# -- conflicts -----------------------------------------------------------------------------------
# The knob that cache_ratio (and so the target_psnr search) maps to, per strategy's options.
RATIO_KNOBS = ("threshold", "interval", "policy", "mask", "masks")
_CACHE_DEFAULTS = {"cache_ratio": 0.0, "warmup": 0, "cooldown": 0, "target_psnr": None}


def conflicts(plan: "Plan", options: BaseModel) -> list[tuple[tuple, str]]:
    """(key path, why) for each pair of settings that cannot both take effect."""
    c, given = plan.cache, options.model_fields_set
    out: list[tuple[tuple, str]] = []
    if c.strategy == "none":
        for name, default in _CACHE_DEFAULTS.items():
            if getattr(c, name) != default:
                out.append((("cache", name), f"cache.{name} = {short_repr(getattr(c, name))} has no effect with "
                            "cache.strategy 'none' (set a strategy: dbcache, teacache, taylorseer, scm, schedule, "
                            f"magcache; or remove cache.{name})"))
    if c.target_psnr is not None:
        if c.cache_ratio != 0.0:  # the search picks the ratio (calibrate.search_ratio), ignoring this one
            out.append((("cache", "cache_ratio"), "cache.target_psnr searches cache_ratio itself, so "
                        f"cache.cache_ratio = {c.cache_ratio:g} would be ignored (remove one of them)"))
        for knob in RATIO_KNOBS:
            if knob in given and getattr(options, knob) is not None:
                out.append((("cache", "options", knob), f"cache.target_psnr searches the knob cache_ratio maps to, "
                            f"but cache.options.{knob} fixes it (remove one of them)"))
    for a, b in (("policy", "mask"), ("scm_policy", "scm_mask")):
        if getattr(options, a, None) is not None and getattr(options, b, None) is not None:
            out.append((("cache", "options", a), f"cache.options.{a} and cache.options.{b} both set the step "
                        f"mask; {b} would win and {a} be ignored (keep one)"))
    for name in ("mask", "scm_mask"):
        mask = getattr(options, name, None)
        if mask is not None and len(mask) != plan.num_inference_steps:
            out.append((("cache", "options", name), f"cache.options.{name} has {len(mask)} entries for "
                        f"num_inference_steps {plan.num_inference_steps} (give one true/false per step, or a policy)"))
    masks = getattr(options, "masks", None)
    if masks is not None and len(masks) != options.ranges:
        out.append((("cache", "options", "masks"), f"cache.options.masks has {len(masks)} masks for ranges "
                    f"{options.ranges} (give one mask per block range)"))
    for k, mask in enumerate(masks or []):
        if len(mask) != plan.num_inference_steps:
            out.append((("cache", "options", "masks"), f"cache.options.masks[{k}] has {len(mask)} entries for "
                        f"num_inference_steps {plan.num_inference_steps} (give one true/false per step)"))
    if getattr(options, "rescale", None) is not None and "calibration_seeds" in given:
        out.append((("cache", "options", "calibration_seeds"), "cache.options.calibration_seeds only applies "
                    "when the rescale polynomial is calibrated, and cache.options.rescale gives it (remove one)"))
    from dacc.schema.plan import SMOOTHABLE_MODES  # plan.py imports this module
    q, defaults = plan.quantize, type(plan.quantize)()
    # by value, not by presence: a plan dumped with every default (the artifact's plan.yaml) reads back
    changed = [k for k in ("exclude", "fragile", "overrides", "group_size", "target_psnr", "smoothing", "rounding")
               if getattr(q, k) != getattr(defaults, k)]
    used = {q.mode, *q.overrides.values()}  # the modes some linear may get
    for knob in changed:
        if q.mode == "none":
            out.append((("quantize", knob), f"quantize.{knob} has no effect with quantize.mode 'none' (remove it)"))
        elif knob == "group_size" and "int4_weight" not in used:
            out.append((("quantize", knob), f"quantize.group_size applies to int4_weight only, not to "
                        f"quantize.mode '{q.mode}' (remove it)"))
        elif knob == "rounding" and "int4_weight" not in used:
            out.append((("quantize", knob), "quantize.rounding chooses the levels of int4_weight only, not of "
                        f"quantize.mode '{q.mode}' (remove it)"))
        elif knob == "smoothing" and not used & set(SMOOTHABLE_MODES):
            out.append((("quantize", knob), f"quantize.smoothing moves activation outliers into the weights for "
                        f"{', '.join(SMOOTHABLE_MODES)}, whose integer activations they starve, not '{q.mode}' "
                        "(remove it)"))
    par = plan.parallel
    if par.auto is not None:
        for name in ("cfg", "ulysses", "ring", "fsdp"):
            if getattr(par, name) != 1:
                out.append((("parallel", name), f"parallel.{name} = {getattr(par, name)} and parallel.auto both "
                            "set the degrees (give the degrees, or auto with a world_size)"))
    if par.vae_patch > 1 and par.world_size > par.vae_patch:
        out.append((("parallel", "vae_patch"), "parallel.vae_patch splits a VAE decoder, the other degrees a "
                    "transformer: compile each model with its own degrees (same world size, one artifact each)"))
    if plan.parallel.world_size > 1 and plan.lower.backend != "none" and plan.lower.device == "cuda":
        out.append((("lower", "device"), "lower.device cuda with parallel degrees: a parallel plan is lowered on "
                    "its ranks, and the compiler starts them as local CPU processes (gloo); lower it for cpu, "
                    "or compile the plan without lower and let the ranks run its graphs on CUDA"))
    if c.warmup + c.cooldown > plan.num_inference_steps:
        out.append((("cache", "warmup"), f"cache.warmup ({c.warmup}) + cache.cooldown ({c.cooldown}) exceed "
                    f"num_inference_steps ({plan.num_inference_steps}) (lower warmup/cooldown or raise "
                    "num_inference_steps)"))
    return out

