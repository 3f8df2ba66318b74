"""The command line: every kind of bad input is one clear paragraph, exit code 2, nothing written."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dacc.cli import main
from dacc.models import model_file

GOOD = model_file("dit")

UNTRACEABLE = """
import torch

class Gate(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, hidden_states):
        return self.gate(self.proj(hidden_states))

def build():
    return Net()

def example_inputs():
    return {"hidden_states": torch.randn(2, 3, 4)}
"""

NO_BLOCKS = UNTRACEABLE.replace("if x.sum() > 0:  # data-dependent Python control flow\n            return x * 2\n", "")

CASES = {
    "missing model file": (None, None, ["does not exist"]),
    "syntax error": ("def build(:\n", None, ["syntax error", "model.py:1"]),
    "no build": ("def example_inputs():\n    return {}\n", None, ["does not define build()"]),
    "build raises": ("def build():\n    raise ValueError('no weights here')\ndef example_inputs():\n    return {}\n",
                     None, ["build() raised ValueError: no weights here", "model.py:2"]),
    "bad example inputs": ("import torch\ndef build():\n    return torch.nn.Linear(2, 2)\n"
                           "def example_inputs():\n    return [1]\n", None, ["example_inputs() must return a dict"]),
    "untraceable": (UNTRACEABLE, None, ["could not trace Net", "module gate (Gate)", "if x.sum() > 0"]),
    "no transformer blocks": (NO_BLOCKS, None, ["no transformer blocks found"]),
    "malformed yaml": ("GOOD", "cache: [1,\n", ["not valid YAML", "plan.yaml:"]),
    "unknown plan key": ("GOOD", "cache:\n  threshold: 0.1\n", ["unknown key 'cache.threshold'", "allowed keys here"]),
    "mistyped plan value": ("GOOD", "num_inference_steps: -3\n", ["num_inference_steps", "greater than or equal to 1"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, tmp_path, capsys):
    source, plan, fragments = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    model = work / "model.py"
    if source == "GOOD":
        model = GOOD
    elif source is not None:
        model.write_text(textwrap.dedent(source))
    args = ["compile", str(model), "-o", str(work / "out.dacc")]
    if plan is not None:
        (work / "plan.yaml").write_text(plan)
        args += ["--plan", str(work / "plan.yaml")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dacc compile: error: ")  # one paragraph, no traceback
    for fragment in fragments:
        assert fragment in err, err
    assert not (work / "out.dacc").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".out.dacc")]


def test_existing_output_is_kept_without_force(tmp_path, capsys):
    out = tmp_path / "out.dacc"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    assert main(["compile", str(GOOD), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == "{}"


def test_inspect_a_corrupt_artifact(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{not json")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "manifest.json is not valid JSON" in capsys.readouterr().err


@pytest.mark.slow  # `make test-all`: end to end, covered piece by piece in `make test`
def test_console_script_compiles_and_inspects(tmp_path):
    """The installed `dacc` command, end to end, as a user runs it."""
    exe = [sys.executable, "-m", "dacc.cli"]
    out = tmp_path / "dit.dacc"
    run = subprocess.run(exe + ["compile", str(GOOD), "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "verified example 1" in run.stderr
    shown = subprocess.run(exe + ["inspect", str(out)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    for fragment in ["program 0", "program 1", "transformer_blocks.0", "FLOPs @ example", "strategy: none"]:
        assert fragment in shown.stdout
    helped = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "compile" in helped.stdout and "inspect" in helped.stdout
