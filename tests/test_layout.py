"""The project's shape: each stage imports only earlier ones (so no cycles), and shared ideas have one home."""
import ast

import pytest

from conftest import ROOT

# The stages in the order they build on each other; a file may import only files before it.
ORDER = ["cli", "smollm2", "model", "lora", "prep", "sft", "memory", "sample", "eval", "tda", "steer", "rlaif", "ppo", "bench"]


def imports(name: str) -> set[str]:
    """Every project module that name.py imports, at the top or inside a function."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_a_stage_imports_only_earlier_stages(name):
    later = {m for m in imports(name) if ORDER.index(m) >= ORDER.index(name)}
    assert not later, f"{name}.py imports {sorted(later)}, which come after it"


def test_every_top_level_python_file_has_a_place_in_the_order():
    assert {p.stem for p in ROOT.glob("*.py")} == set(ORDER)


def test_model_py_holds_the_model_and_no_command_line_helpers():
    tree = ast.parse((ROOT / "model.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & {"BadInput", "parse_options", "exit_on_bad_input", "write_atomically", "command"}
