"""The sizes a prediction is for: a program's example sizes, some replaced by the user's."""
from __future__ import annotations

from dacc.schema.errors import DaccError
from dacc.schema.expr import BOOL, evaluate
from dacc.schema.manifest import ProgramSpec


def example_symbols(program: ProgramSpec) -> dict[str, int]:
    return {s.name: program.example_shapes[s.input][s.dim] for s in program.symbols}


def sizes_at(program: ProgramSpec, at: dict[str, int] | None, where: str, knob: str = "--at") -> dict[str, int]:
    """Symbol -> size: the example's, with `at` replacing some; sizes the program's shape
    conditions refuse, or names that are not its symbols, are errors."""
    env = example_symbols(program)
    unknown = sorted(set(at or {}) - set(env))
    if unknown:
        raise DaccError(f"{knob} names {', '.join(unknown)}, not symbols of the program", where,
                        f"use the program's symbols: {', '.join(env) or '(none: it serves one size)'}")
    env.update(at or {})
    broken = [text for tree, text in zip(program.guards, program.guard_text) if at and not evaluate(tree, env, text, BOOL)]
    if broken:
        raise DaccError(f"{knob} sizes {at} break the program's shape condition {broken[0]}", where,
                        "give every size the condition ties together (the symbols and guards are listed by "
                        "`dacc inspect`)")
    return env
