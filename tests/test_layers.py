"""Imports run one way: cli -> eval/interop/sweep -> train -> runs/data/parallel/infer ->
model -> ops, with config, errors and the start-up helpers as leaves (docs/architecture.md).

Every import in hybridlm/ counts, function-level ones too (a late import hides a cycle, it
does not remove it); only the `if __name__ == "__main__":` guard of a module is left out.
"""

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hybridlm"

# the layer of each top-level part of hybridlm; a part may import its own layer or below
LAYERS = {
    "__main__": 0, "cli": 0,
    "eval": 1, "interop": 1, "sweep": 1, "sweep_status": 1,
    "train": 2,
    "runs": 3, "data": 3, "parallel": 3, "infer": 3,
    "model": 4,
    "ops": 5,
}
LEAVES = {"config": {"errors", "data", "model", "ops", "parallel", "train"},  # choice lists
          "errors": set(), "hugepages": set(), "platforms": set(), "__init__": set()}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str:
    """'hybridlm.train.step' -> 'train'; 'hybridlm' -> '__init__'."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__")


def imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """The hybridlm modules a module's code imports (outside its __main__ guard)."""
    out, todo = set(), [tree]
    while todo:
        node = todo.pop()
        if is_main_guard(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in out if m == "hybridlm" or m.startswith("hybridlm.")}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imported(ast.parse(p.read_text()), set(paths)) - {m} for m, p in paths.items()}


def test_every_part_of_the_package_has_a_layer():
    parts = {part(m) for m in import_graph()}
    assert parts == set(LAYERS) | set(LEAVES), parts ^ (set(LAYERS) | set(LEAVES))


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in import_graph().items():
        source = part(module)
        for target in targets:
            dest = part(target)
            if dest == source:
                continue
            if source in LEAVES:
                ok = dest in LEAVES[source] or (dest in LEAVES and not LEAVES[dest])
            else:
                ok = dest in LEAVES or LAYERS[dest] >= LAYERS[source]
            if not ok:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_back():
    graph = import_graph()
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue  # a package's own name resolves to its __init__ module
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_late_upward_import():
    """The walk finds imports inside functions, and skips only the __main__ guard."""
    source = ("def f():\n    from hybridlm.train import step\n"
              "if __name__ == '__main__':\n    import hybridlm.cli\n")
    assert imported(ast.parse(source), {"hybridlm.train.step"}) == {"hybridlm.train.step"}
