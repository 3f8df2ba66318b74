from __future__ import annotations

from dacc.runtime.steps import StepCounter


def test_a_generation_is_num_inference_steps_calls():
    c = StepCounter(num_inference_steps=3)
    assert [c.advance(None) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert c.generation == 2 and c.total_steps == 7


def test_timestep_going_up_starts_a_new_generation():
    c = StepCounter(num_inference_steps=50)
    assert [c.advance(t) for t in (999.0, 800.0, 600.0, 999.0, 700.0)] == [0, 1, 2, 0, 1]
    assert c.generation == 1


def test_repeated_timestep_is_the_same_step():
    c = StepCounter(num_inference_steps=50)
    assert [c.advance(t) for t in (1.0, 1.0, 0.5, 0.5, 0.1)] == [0, 0, 1, 1, 2]
    assert c.calls == 5 and c.total_steps == 3
