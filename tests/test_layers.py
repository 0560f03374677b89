"""The package's shape: data_synth is a library that imports nothing of upstack; upstack's layers
(kernel, stages, commands) import only downward; no module imports itself in a cycle."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap

from conftest import ROOT

# A module's layer; it may import its own layer and those below, never above. Stage modules
# (upstack.stages.<kind>) may not import each other: what two stages share lives in the kernel.
COMMANDS = {"upstack.cli", "upstack.report", "upstack.import_merge", "upstack.__main__"}


def layer(module: str) -> int:
    if module.startswith("data_synth"):
        return 0
    if module in COMMANDS:
        return 3
    if module.startswith("upstack.stages."):
        return 2
    return 1  # the kernel and what stages share: recipe, runner, context, refs, training, data, ...


def modules() -> dict[str, ast.Module]:
    found = {}
    for package, root in (
        ("upstack", ROOT / "src" / "upstack"),
        ("data_synth", ROOT / "data_synth"),
    ):
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = ast.parse(path.read_text(), str(path))
    return found


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Every project module `tree` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in known
                else node.module
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imports(tree, known) - {name} for name, tree in trees.items()}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join([*path, name])
        state[name] = "open"
        for other in sorted(edges[name]):
            visit(other, [*path, name])
        state[name] = "done"

    for name in sorted(edges):
        visit(name, [])


def test_layers_import_only_downward():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if layer(target) > layer(name):
                wrong.append(
                    f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
                )
            elif layer(name) == layer(target) == 2:
                wrong.append(f"stage module {name} imports stage module {target}")
    assert not wrong, "\n".join(wrong)
    # the walk does see imports, top-level and inside functions alike
    assert {"upstack.recipe", "data_synth.files"} <= graph()["upstack.stages.synth"]


BLOCK_UPSTACK = """
import importlib.abc, sys
class NoUpstack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "upstack" or name.startswith("upstack."):
            raise ImportError("upstack is not on this path")
sys.meta_path.insert(0, NoUpstack())
"""


def run_without_upstack(code: str, cwd) -> subprocess.CompletedProcess:
    """Python with upstack's dependencies but no upstack importable."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK_UPSTACK + textwrap.dedent(code)],
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_data_synth_imports_without_upstack(tmp_path):
    names = sorted(n for n in modules() if n.startswith("data_synth"))
    result = run_without_upstack(
        f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\nprint('ok')",
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_readme_data_synth_example_runs_without_upstack(tmp_path):
    """README's few lines: rephrase a jsonl of problems with an OpenAI-compatible teacher."""
    from data_synth import echo_server

    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- data_synth example -->\s*```python\n(.*?)```", text, re.S).group(1)
    problems = [
        {
            "question": f"Ana has {n} pens and buys 2 more. How many?",
            "solution": f"{n} + 2 = {n + 2}. The answer is \\boxed{{{n + 2}}}.",
            "answer": str(n + 2),
        }
        for n in range(3, 8)
    ]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    with echo_server.running() as url:
        result = run_without_upstack(code.replace("http://localhost:8000/v1", url), tmp_path)
        assert result.returncode == 0, result.stderr
        again = run_without_upstack(code.replace("http://localhost:8000/v1", url), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    # the echo teacher returns each solution as its rephrased answer: all five verify
    assert len([r for r in records if r["augmentation"] == "rephrase_answer"]) == 5
    assert "'requests_sent': 0" in again.stdout  # the rerun was answered by the cache alone
