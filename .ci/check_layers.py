"""The layering contract, read from the code's own imports (ast; nothing is imported or run).

Layers, top to bottom; a module may import its own layer and the ones below, never one above, and no two
modules may import each other in a cycle (imports inside functions count too). Exit 1 with the list otherwise.
    python .ci/check_layers.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "robot_rl": ROOT / "robot_rl",
    "robot_rl.hardware": ROOT / "hardware",
    "robot_rl.sim": ROOT / "sim",
    "robot_rl.configs": ROOT / "configs",
}
LAYERS = [  # (name, module prefixes)
    ("entry point", ["robot_rl.cli"]),
    ("commands", ["robot_rl.commands"]),
    (
        "workflows",
        ["robot_rl.control", "robot_rl.learner", "robot_rl.training", "robot_rl.rollout", "robot_rl.factory"],
    ),
    ("algorithms", ["robot_rl.algos"]),
    (
        "shared parts",
        [
            "robot_rl.policies",
            "robot_rl.data",
            "robot_rl.reward",
            "robot_rl.transport",
            "robot_rl.hardware",
            "robot_rl.sim",
            "robot_rl.nn",
            "robot_rl.video",
            "robot_rl.viz",
        ],
    ),
    ("interfaces", ["robot_rl.interfaces", "robot_rl.config", "robot_rl.configs", "robot_rl"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for prefix, d in PACKAGES.items():
        for f in d.rglob("*.py"):
            parts = [p for p in f.relative_to(d).with_suffix("").parts if p != "__init__"]
            found[".".join([prefix, *parts])] = f
    return found


def layer_of(mod: str) -> int:
    best, best_len = len(LAYERS) - 1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def imports_of(path: Path, mod: str, known: dict[str, Path]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".")[: -1 if path.name != "__init__.py" else None]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base]) if base else ".".join(pkg)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of size > 1, Tarjan's
    algorithm written iteratively: the module graph is deep enough to hit Python's recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)

    for root in graph:
        if root in index:
            continue
        visit(root)
        work = [(root, iter(sorted(graph[root])))]
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    visit(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:  # all children of v done
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
                if low[v] == index[v]:
                    group = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        group.append(w)
                        if w == v:
                            break
                    if len(group) > 1:
                        found.append(sorted(group))
    return found


def main() -> int:
    known = modules()
    graph = {m: imports_of(f, m, known) - {m} for m, f in known.items()}
    upward = [(m, d) for m, deps in graph.items() for d in sorted(deps) if layer_of(d) < layer_of(m)]
    # a package __init__ importing its own submodules is a re-export, not a cycle
    no_init = {m: {d for d in deps if known[d].name != "__init__.py"} for m, deps in graph.items()}
    found = cycles(no_init)
    for m, d in upward:
        print(f"upward import: {m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})")
    for c in found:
        print("import cycle: " + " <-> ".join(c))
    print(f"layers: {len(upward)} upward imports, {len(found)} cycles, {len(known)} modules")
    return 1 if upward or found else 0


if __name__ == "__main__":
    sys.exit(main())
