"""The package's import graph: one direction, no cycle, with function-level imports counted as module-level ones
(so none of them hides a cycle); sampling and the update do not import each other; rollout.py is data only."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "simko"


def module_name(path: Path) -> str:
    return ".".join(("simko", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The simko modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simko"):
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if alias.name.startswith("simko")]
        for target in targets:
            if target in MODULES:
                out.add(target)
            elif target == targets[-1] or not any(t in MODULES for t in targets):
                while target and target not in MODULES:
                    target = target.rpartition(".")[0]
                if target:
                    out.add(target)
    out.discard(name)
    return out


GRAPH = {name: imported_modules(name) for name in MODULES}


def reaches(start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in GRAPH[node]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def cycle() -> list[str] | None:
    """One import cycle between simko modules, or None (a package's ``__init__`` counts as the package)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle_even_counting_function_level_imports():
    assert cycle() is None


def test_the_graph_sees_the_known_edges():
    assert "simko.rollout" in GRAPH["simko.engines.hf"] and "simko.kv_cache" in GRAPH["simko.engines.hf"]
    assert "simko.kv_cache" in GRAPH["simko.forward"] and "simko.evaluation" in GRAPH["simko.module"]


def test_sampling_and_the_update_are_independent():
    """The engines sample without the update's code, and the update trains without the engines': both read the
    Rollouts data type, and share only the KV-prefix helpers (simko.kv_cache)."""
    for engine in ("simko.engines.base", "simko.engines.hf", "simko.engines.vllm"):
        for update_side in ("simko.update", "simko.forward", "simko.losses", "simko.sampling_filters"):
            assert not reaches(engine, update_side), (engine, update_side)
    for update_side in ("simko.update", "simko.forward", "simko.sampling_filters"):
        assert not reaches(update_side, "simko.engines"), update_side
    assert GRAPH["simko.rollout"] == set()  # the data type and its constructor helpers only
    assert GRAPH["simko.kv_cache"] == set()


def test_the_update_knows_no_lightning_and_eval_no_train():
    update_imports = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(MODULES["simko.update"].read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not {"lightning", "pytorch_lightning"} & update_imports
    assert not reaches("simko.eval", "simko.train")
    assert not reaches("simko.module", "simko.train") and not reaches("simko.module", "simko.eval")


def test_the_readme_layout_map_draws_every_module_above_what_it_imports():
    """README's Layout map: every package module is on it, and each imports only modules drawn on lines below its
    own or right of it on its line (the map is the import direction)."""
    import re

    readme = (SRC.parents[1] / "README.md").read_text()
    block = readme[readme.index("```\nsrc/simko/") :]
    lines = block[: block.index("\nconfigs/")].splitlines()[2:]
    where: dict[str, tuple[int, int]] = {}
    for row, line in enumerate(lines):
        for match in re.finditer(r"([a-z_]+)(?:\.py|/)", line[:42]):
            where.setdefault(match.group(1), (row, match.start()))
    top = {name: name.split(".")[1] for name in MODULES if name != "simko"}
    assert set(top.values()) <= set(where), f"not on the map: {sorted(set(top.values()) - set(where))}"
    upward = sorted(
        {
            (top[a], top[b])
            for a, targets in GRAPH.items()
            if a in top
            for b in targets
            if b in top and top[a] != top[b] and where[top[b]] <= where[top[a]]
        }
    )
    assert not upward, f"drawn below (or left of) what imports them: {upward}"
