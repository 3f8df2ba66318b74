from __future__ import annotations

import pytest

from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan, load_plan, parse_plan


def test_defaults_are_the_empty_plan():
    plan = parse_plan({})
    assert plan == Plan()
    assert plan.cache.strategy == "none" and plan.parallel.ulysses == 1 and plan.quantize.mode == "none"


def test_round_trip_through_yaml(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("num_inference_steps: 28\ncache: {strategy: dbcache, warmup: 2, cooldown: 1}\n")
    plan = load_plan(path)
    assert plan.num_inference_steps == 28 and plan.cache.warmup == 2
    (tmp_path / "again.yaml").write_text(plan.to_yaml())
    assert load_plan(tmp_path / "again.yaml") == plan


@pytest.mark.parametrize("data, fragments", [
    ({"cahce": {}}, ["unknown key 'cahce'", "did you mean 'cache'", "allowed keys here: num_inference_steps"]),
    ({"cache": {"stratgy": "none"}}, ["unknown key 'cache.stratgy'", "did you mean 'strategy'"]),
    ({"cache": {"strategy": "fastest"}}, ["cache.strategy", "'fastest'", "'none'"]),
    ({"cache": {"cache_ratio": 1.5}}, ["cache.cache_ratio", "less than or equal to 1"]),
    ({"num_inference_steps": "many"}, ["num_inference_steps", "valid integer"]),
    ({"parallel": {"vae_patch": 65}}, ["parallel.vae_patch", "64"]),
    ({"parallel": {"cfg": 4}}, ["parallel.cfg", "1", "2"]),
    ({"parallel": {"ulysses": 0}}, ["parallel.ulysses", "greater than or equal to 1"]),
    ({"parallel": {"ulysses": 2}, "lower": {"backend": "inductor", "device": "cuda"}},
     ["lower.device", "parallel degrees", "lower it for cpu"]),
    ({"cache": {"strategy": "scm", "warmup": 30, "cooldown": 30}}, ["warmup (30) + cache.cooldown (30) exceed num_inference_steps (50)"]),
    ([1, 2], ["must be a mapping"]),
])
def test_bad_plans_name_file_key_and_allowed_values(data, fragments):
    with pytest.raises(DaccError) as info:
        parse_plan(data, "my/plan.yaml")
    msg = str(info.value)
    assert "my/plan.yaml" in msg
    for fragment in fragments:
        assert fragment in msg


def test_malformed_yaml_points_at_the_line(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("cache:\n  strategy: none\n   warmup: [1,\n")
    with pytest.raises(DaccError, match=r"not valid YAML.*plan.yaml:\d+:\d+"):
        load_plan(path)


def test_missing_plan_file(tmp_path):
    with pytest.raises(DaccError, match="does not exist"):
        load_plan(tmp_path / "nope.yaml")


@pytest.mark.parametrize("cache, fragments", [
    ({"strategy": "dbcache", "options": {"threshold": -0.1}}, ["cache.options.threshold", "greater than or equal to 0"]),
    ({"strategy": "scm", "options": {"policy": "turbo"}}, ["cache.options.policy", "'turbo'", "'slow'"]),
    ({"strategy": "dbcache", "options": {"fn": 2}}, ["unknown key 'cache.options.fn'", "did you mean 'Fn'"]),
    ({"strategy": "taylorseer", "options": {"order": 3}}, ["cache.options.order", "less than or equal to 2"]),
    ({"strategy": "none", "options": {"Fn": 1}}, ["unknown key 'cache.options.Fn'", "(none)"]),
    ({"strategy": "dbcache", "warmup": 40, "cooldown": 20}, ["exceed num_inference_steps (50)"]),
])
def test_bad_cache_knobs(cache, fragments):
    with pytest.raises(DaccError) as info:
        parse_plan({"cache": cache}, "plan.yaml")
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("extra", [{"cache": {"strategy": "teacache"}}, {"cache": {"strategy": "schedule"}},
                                   {"cache": {"strategy": "dbcache", "target_psnr": 30}},
                                   {"quantize": {"mode": "int8_weight", "target_psnr": 35}}])
def test_parallel_plans_take_what_calibrates_on_one_process(extra):
    """Calibration and the searches run on the single-process twin or the eager model
    (tests/runtime/test_parallel.py runs the calibrated ones), so no parallel degree refuses them."""
    plan = parse_plan({"parallel": {"cfg": 2, "ulysses": 2}, **extra})
    assert plan.parallel.world_size == 4
