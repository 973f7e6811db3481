"""No import cycles between tfkdp's modules (package `__init__` re-exports aside)."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Repository folder -> installed package name.
PACKAGES = {"tfkdp": "tfkdp", "export": "export", "pipelines": "pipelines"}


def _modules():
    """{module name: path} of every module under the three packages."""
    found = {}
    for folder, package in PACKAGES.items():
        root = os.path.join(REPO, folder)
        for dirpath, _, files in os.walk(root):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].replace(os.sep, ".")
                module = package if rel == "__init__" else f"{package}.{rel}"
                module = module.removesuffix(".__init__")
                found[module] = os.path.join(dirpath, name)
    return found


def _imports(path, module, modules):
    """Modules `module` imports anywhere in its file (function-level imports included)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = path.endswith("__init__.py")
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                parent = parts if is_package else parts[:-1]
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                targets.add(candidate if candidate in modules else base)
    return {t for t in targets if t in modules}


def _graph():
    modules = _modules()
    packages = {m for m, p in modules.items() if p.endswith("__init__.py")}
    graph = {}
    for module, path in modules.items():
        if module in packages:
            continue  # re-export hubs: importing a submodule runs them anyway
        graph[module] = sorted(_imports(path, module, modules) - packages - {module})
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "active"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "active":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_module_imports_itself_through_a_cycle():
    graph = _graph()
    assert len(graph) > 30  # the walk found the library, not an empty folder
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = dict(_graph())
    graph["tfkdp.pruning.walker"] = [*graph["tfkdp.pruning.walker"], "tfkdp.pruning.surgery"]
    cycle = _find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert "tfkdp.pruning.walker" in cycle
