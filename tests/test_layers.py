"""The package's shape: data_synth is a library that imports nothing of upstack; upstack's layers
(core, models, train and growth, stages, commands) import only downward; no module imports
itself in a cycle; and modules found by name (importlib) are found only where the layers allow."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap

from conftest import ROOT

# Each folder of src/upstack is a layer; a module may import its own folder and lower layers,
# never a higher layer nor a sibling folder of its own layer. Stage modules (upstack.stages.<kind>)
# may not import each other: what two stages share lives below them.
LAYERS = {
    "data_synth": 0,  # a library of its own
    "upstack": 1,  # the package itself (its __init__)
    "upstack.core": 1,  # the kernel
    "upstack.models": 2,  # checkpoints, shapes, layer maps, mergekit configs
    "upstack.train": 3,  # what cpt, sft and dpo share
    "upstack.growth": 3,  # upscale's methods
    "upstack.stages": 4,
    "upstack.commands": 5,
}
# `python -m upstack` is the command line's, though it sits at the package's top
ALIASES = {"upstack.__main__": "upstack.commands"}
# The one module that finds other modules by name: the kernel's registry of stage kinds, which
# may name stage modules only (it is how the kernel runs a kind without importing it upward).
REGISTRY = "upstack.core.registry"


def folder(module: str) -> str:
    if module in ALIASES:
        return ALIASES[module]
    return max((f for f in LAYERS if module == f or module.startswith(f + ".")), key=len)


def layer(module: str) -> int:
    return LAYERS[folder(module)]


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


def lookups(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports by name: calls of import_module/__import__/find_spec and what they name (the
    string, or `?` when it is computed), with the line."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
        if name in ("import_module", "__import__", "find_spec") and node.args:
            target = node.args[0]
            text = target.value if isinstance(target, ast.Constant) else "?"
            found.append((node.lineno, name, str(text)))
    return found


def project_strings(tree: ast.Module, known: set[str]) -> set[str]:
    """String constants that name a project module ("upstack.stages.cpt")."""
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known
    }


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
            elif layer(target) == layer(name) and folder(target) != folder(name):
                wrong.append(f"{name} imports {target}, of a sibling folder of its layer")
            elif folder(name) == folder(target) == "upstack.stages" and target != "upstack.stages":
                wrong.append(f"stage module {name} imports stage module {target}")
    assert not wrong, "\n".join(wrong)
    # the walk does see imports, top-level and inside functions alike
    assert {"upstack.core.settings", "data_synth.files"} <= graph()["upstack.stages.synth"]
    assert "upstack.models.checkpoints" in graph()["upstack.stages.eval"]


def test_modules_are_found_by_name_only_by_the_registry():
    """importlib can reach around the layers: only the registry may, and only stage modules."""
    from upstack.core.registry import STAGE_MODULES

    wrong = []
    trees = modules()
    for name, tree in trees.items():
        for line, call, target in lookups(tree):
            # find_spec only looks a top-level name up (third-party ones: liger_kernel, a
            # tracker's package); a project module named there would be an import in disguise
            named = target.split(".")[0] in ("upstack", "data_synth")
            if call != "find_spec" and name != REGISTRY:
                wrong.append(f"{name}:{line}: {call}({target}): only {REGISTRY} imports by name")
            elif call == "find_spec" and named and target != "data_synth":
                wrong.append(f"{name}:{line}: find_spec({target}) of a project module")
        if name != REGISTRY:  # a module named in a string, to run it (python -m) or look it up
            named = project_strings(tree, set(trees))
            wrong += [f"{name} names {m}, a higher layer" for m in named if layer(m) > layer(name)]
    assert not wrong, "\n".join(wrong)
    assert all(folder(module) == "upstack.stages" for module in STAGE_MODULES.values())
    assert project_strings(trees[REGISTRY], set(trees)) == set(STAGE_MODULES.values())


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
