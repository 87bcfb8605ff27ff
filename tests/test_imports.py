"""The house rules that keep the repo readable in one sitting: the project's own imports form a DAG
(model.py and generate.py import nothing of the project), importing a script changes nothing global, and
the line budgets of docs/contributing.md hold."""

import ast
import glob
import os
import subprocess
import sys

import pytest

from conftest import REPO

# where the project's importable modules live: the root (the scripts and helpers), experiments/ (its
# scripts import each other by bare name) and data/ (prepare_common.py)
MODULE_DIRS = ("", "experiments", "data")


def project_modules() -> dict[str, str]:
    """module name -> path, for every .py file of MODULE_DIRS."""
    found = {}
    for folder in MODULE_DIRS:
        for path in sorted(glob.glob(os.path.join(REPO, folder, "*.py"))):
            found.setdefault(os.path.splitext(os.path.basename(path))[0], path)
    return found


def imports_of(path: str, names) -> set[str]:
    """The project modules a file imports anywhere in it (top level or inside a function)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(names)


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None: a depth-first search that meets a
    module still on its stack has closed a loop."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_the_project_imports_form_a_dag():
    graph = import_graph()
    assert {"model", "generate", "train", "runs", "checkpoint", "hf", "common", "tools"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_models_and_generation_stand_alone():
    graph = import_graph()
    assert graph["model"] == set() and graph["generate"] == set() and graph["common"] == set()
    assert graph["configurator"] == {"common"}
    assert graph["hf"] == {"common", "model"} and graph["checkpoint"] == {"common", "hf", "model"}


IMPORT_EVERYTHING = r"""
import json, sys
sys.path[:0] = [{repo!r}, {experiments!r}]
import torch, torch._dynamo
path, flag = list(sys.path), torch._dynamo.config.capture_dynamic_output_shape_ops
for name in {names!r}:
    __import__(name)
print(json.dumps(dict(path=sys.path == path, flag=torch._dynamo.config.capture_dynamic_output_shape_ops == flag)))
"""


def test_importing_a_script_changes_nothing_global():
    """Every script and experiment imports without touching torch's settings or sys.path (the repo
    root is already on it, as when a script runs), so that tests can call main() in-process."""
    names = sorted(n for n, p in project_modules().items() if os.path.dirname(p) in (REPO, os.path.join(REPO, "experiments")))
    code = IMPORT_EVERYTHING.format(repo=REPO, experiments=os.path.join(REPO, "experiments"), names=names)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == '{"path": true, "flag": true}'


@pytest.mark.parametrize("path,budget", [("model.py", 500), ("train.py", 400), ("README.md", 300)])
def test_line_budgets(path, budget):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        assert sum(1 for _ in f) <= budget
