"""Pass infrastructure: a pass rewrites one program's graph in place and returns a PassResult;
the invariant checker runs after every pass; DACC_DUMP=dir writes the graph text after each."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dacc.compiler.ir import ProgramIR
from dacc.compiler.printer import print_graph
from dacc.schema.plan import Plan


@dataclass
class PassResult:
    modified: bool
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PassEntry:
    name: str
    run: Callable[[ProgramIR, Plan], PassResult]
    reason: str


def run_pipeline(ir: ProgramIR, plan: Plan, passes: list[PassEntry], check: Callable[[ProgramIR, str], None],
                 dump_dir: str | None = None, tag: str = "program0",
                 on_graph: Callable[[int, str, str], None] | None = None) -> list[PassResult]:
    """Run `passes` in order. `on_graph(index, name, text)` sees the graph text after each pass
    (index 0 is the traced graph, named "export")."""
    dump_dir = dump_dir or os.environ.get("DACC_DUMP")
    results = []

    def emit(i: int, name: str) -> None:
        if not (dump_dir or on_graph):
            return
        text = print_graph(ir)
        if dump_dir:
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            (Path(dump_dir) / f"{tag}.{i:02d}_{name}.txt").write_text(text)
        if on_graph:
            on_graph(i, name, text)

    check(ir, "export")
    emit(0, "export")
    for i, p in enumerate(passes, start=1):
        result = p.run(ir, plan)
        ir.graph.lint()
        ir.ep.graph_module.recompile()
        check(ir, p.name)
        emit(i, p.name)
        results.append(result)
    return results
