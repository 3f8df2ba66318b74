"""Hostile or sloppy plan files: each is refused quickly with one short paragraph that names the
file, the key (and line) and the fix, or, where the plan is fine, accepted."""
from __future__ import annotations

import time

import pytest

from dacc.schema.errors import DaccError
from dacc.schema.plan import load_plan
from dacc.schema.plan_yaml import MAX_BYTES, MAX_DEPTH

# "billion laughs": 9 ** 9 copies of the string once expanded; the old reader hung composing it
ALIAS_BOMB = "quantize:\n  exclude: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"x{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 9)}]\n" for i in range(9))


def _refused(tmp_path, content: str | bytes, *fragments: str) -> str:
    path = tmp_path / "plan.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    start = time.perf_counter()
    with pytest.raises(DaccError) as info:
        load_plan(path)
    assert time.perf_counter() - start < 1.0
    msg = str(info.value)
    assert str(path) in msg and "Fix:" in msg and "\n" not in msg and len(msg) < 1200, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def _loads(tmp_path, content: str):
    path = tmp_path / "plan.yaml"
    path.write_text(content)
    return load_plan(path)


def test_alias_bomb_is_refused_fast_with_a_short_message(tmp_path):
    msg = _refused(tmp_path, ALIAS_BOMB, "anchors and aliases", "plan.yaml:2")
    assert "lol" not in msg and len(msg) < 300


def test_binary_garbage_is_refused(tmp_path):
    _refused(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text", "binary file")
    _refused(tmp_path, b"cache: {strategy: none}\n\x00\x01\x02", "control character", "plan.yaml:2")


def test_deep_nesting_is_refused_on_the_event_stream(tmp_path):
    _refused(tmp_path, "quantize: {exclude: " + "[" * 5000 + "]" * 5000 + "}", f"deeper than {MAX_DEPTH} levels")
    _refused(tmp_path, "".join(" " * i + f"k{i}:\n" for i in range(200)), f"deeper than {MAX_DEPTH} levels")


def test_oversized_file_is_refused(tmp_path):
    _refused(tmp_path, "# " + "x" * MAX_BYTES + "\n", "larger than 64 KiB")


def test_a_bool_is_not_a_count(tmp_path):
    _refused(tmp_path, "num_inference_steps: true\n", "key 'num_inference_steps' (line 1)", "valid integer",
             "got True", "allowed: an integer (>= 1, <= 10000)")


def test_an_integer_is_a_valid_number(tmp_path):
    plan = _loads(tmp_path, "cache: {strategy: dbcache, options: {threshold: 1}}\n")
    assert plan.cache.options == {"threshold": 1}
    _refused(tmp_path, "cache: {strategy: dbcache, options: {threshold: '0.1'}}\n", "valid number", "got '0.1'")
    _refused(tmp_path, "cache: {strategy: dbcache, options: {Fn: 2.0}}\n", "cache.options.Fn", "valid integer")
    _refused(tmp_path, "cache: {strategy: scm, options: {mask: [1, 0]}}\n", "cache.options.mask.0",
             "allowed: true or false")


@pytest.mark.parametrize("text, value", [("1e9", 1e9), ("1.0e9", 1e9), ("-2.5E-3", -2.5e-3), ("1.0e+9", 1e9)])
def test_exponent_notation_is_a_number_as_in_yaml_1_2(tmp_path, text, value):
    plan = _loads(tmp_path, f"cache: {{strategy: dbcache, options: {{threshold: {text}}}}}\n") \
        if value >= 0 else None
    if plan is not None:
        assert plan.cache.options == {"threshold": value}
    else:  # a negative threshold is refused by its range, so it was read as a number
        _refused(tmp_path, f"cache: {{strategy: dbcache, options: {{threshold: {text}}}}}\n", ">= 0.0")


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    _refused(tmp_path, "num_inference_steps: 20\ncache:\n  strategy: dbcache\n  strategy: scm\n",
             "duplicate key 'strategy' (first given on line 3)", "plan.yaml:4")


def test_strategy_none_with_a_cache_knob_is_a_conflict(tmp_path):
    _refused(tmp_path, "cache: {strategy: none, cache_ratio: 0.5}\n", "cache.cache_ratio = 0.5 has no effect",
             "cache.strategy 'none'", "dbcache, teacache, taylorseer, scm")
    _refused(tmp_path, "cache:\n  warmup: 2\n", "cache.warmup = 2 has no effect", "plan.yaml:2")
    _refused(tmp_path, "cache: {target_psnr: 30}\n", "cache.target_psnr = 30.0 has no effect")


def test_target_psnr_conflicts_with_the_knobs_it_searches(tmp_path):
    _refused(tmp_path, "cache:\n  strategy: dbcache\n  target_psnr: 30\n  cache_ratio: 0.4\n",
             "target_psnr searches cache_ratio itself", "cache_ratio = 0.4 would be ignored", "plan.yaml:4")
    _refused(tmp_path, "cache: {strategy: taylorseer, target_psnr: 30, options: {interval: 3}}\n",
             "cache.options.interval fixes it")
    assert _loads(tmp_path, "cache: {strategy: taylorseer, target_psnr: 30, options: {order: 2}}\n").cache.target_psnr == 30


def test_step_mask_conflicts(tmp_path):
    _refused(tmp_path, "num_inference_steps: 3\ncache: {strategy: scm, options: {policy: fast, mask: [true, false, true]}}\n",
             "cache.options.policy and cache.options.mask both set the step mask")
    _refused(tmp_path, "num_inference_steps: 3\ncache: {strategy: dbcache, options: {scm_policy: fast, "
             "scm_mask: [true, false, true]}}\n", "scm_policy and cache.options.scm_mask")
    _refused(tmp_path, "cache: {strategy: scm, options: {mask: [true, false]}}\n",
             "cache.options.mask has 2 entries for num_inference_steps 50")
    _refused(tmp_path, "num_inference_steps: 3\ncache: {strategy: schedule, options: {ranges: 2, masks: "
             "[[true, false, true]]}}\n", "cache.options.masks has 1 masks for ranges 2")
    _refused(tmp_path, "num_inference_steps: 3\ncache: {strategy: schedule, options: {ranges: 2, masks: "
             "[[true, false, true], [true, true]]}}\n", "cache.options.masks[1] has 2 entries for num_inference_steps 3")
    _refused(tmp_path, "cache: {strategy: schedule, target_psnr: 30, options: {masks: [[true]]}}\n",
             "cache.options.masks fixes it")
    plan = _loads(tmp_path, "num_inference_steps: 3\ncache: {strategy: schedule, options: {ranges: 2, masks: "
                  "[[true, false, true], [true, true, true]]}}\n")
    assert plan.cache.options["masks"][0] == [True, False, True]


def test_other_settings_that_would_be_ignored(tmp_path):
    _refused(tmp_path, "cache: {strategy: teacache, options: {rescale: [1.0, 0.0], calibration_seeds: 4}}\n",
             "calibration_seeds only applies when the rescale polynomial is calibrated")
    _refused(tmp_path, "quantize: {exclude: [proj_out]}\n", "quantize.exclude has no effect with quantize.mode 'none'")
    _refused(tmp_path, "cache: {strategy: teacache, options: {rescale: []}}\n", "cache.options.rescale", "at least 1")
    _refused(tmp_path, "parallel: {vae_patch: 2, ulysses: 2}\n", "parallel.vae_patch splits a VAE decoder")
    _refused(tmp_path, "parallel: {fsdp: 2, auto: {world_size: 4}}\n", "parallel.fsdp = 2 and parallel.auto both set")


@pytest.mark.parametrize("content, fragment", [
    ("num_inference_steps: !!int 5\n", "YAML tags"),
    ("cache: !!python/object:os.system {}\n", "YAML tags"),
    ("<<: {num_inference_steps: 5}\n", "merge keys"),
    ("? [a, b]\n: 1\n", "a plan key must be a plain name"),
    ("num_inference_steps: 0x_\n", "cannot read the value '0x_'"),
    ("num_inference_steps: 2001-02-30\n", "cannot read the value '2001-02-30'"),
    ("cache: {cache_ratio: .nan}\n", "finite number"),
    ("cache:\n  strategy: none\n   warmup: [1,\n", "not valid YAML"),
    ("a: 1\n---\nb: 2\n", "not valid YAML"),
])
def test_yaml_features_a_plan_does_not_need(tmp_path, content, fragment):
    _refused(tmp_path, content, fragment)


def test_huge_values_are_not_printed(tmp_path):
    msg = _refused(tmp_path, "cache: {strategy: '" + "x" * 50_000 + "'}\n", "cache.strategy", "...")
    assert "x" * 100 not in msg
    msg = _refused(tmp_path, "quantize: {exclude: [" + ", ".join(["1"] * 2000) + "]}\n", "and 1995 more")
    assert len(msg) < 1200


def test_comments_and_a_bom_are_fine(tmp_path):
    plan = _loads(tmp_path, "\ufeff# the recommended plan\nnum_inference_steps: 28  # steps\n")
    assert plan.num_inference_steps == 28
    assert _loads(tmp_path, "") == load_plan(None)


def test_a_target_psnr_no_image_can_have_is_refused(tmp_path):
    """PSNR is capped at 100 dB (identical images), so a target above it, or at or below zero, is
    a mistake, not a search."""
    for bad, why in (("0", "greater than 0"), ("-3", "greater than 0"), ("150", "less than or equal to 100"),
                     (".inf", "finite number")):
        _refused(tmp_path, f"cache: {{strategy: dbcache, target_psnr: {bad}}}\n", "cache.target_psnr", why,
                 "plan.yaml:1")
