"""The package's architecture, held by its import graph (function-local imports included).

Layers, bottom up; a module imports only from lower layers and from its own package:

    errors, paths, scoring      leaf modules (no mtmoe imports)
    config                      the structured configs and their validate functions (no torch)
    device                      the device decision
    data                        corpus -> vocabulary -> token ids -> batches
    model                       the plain-torch model, generation, quantized experts, key grammar
    formats                     what is on disk: DeepSpeed checkpoint, run description, export format
    train | export | serve      siblings: none imports another
    eval                        scoring an export, served as it would be
    cli                         the apps

The `python -m mtmoe.<app>` shims (`mtmoe.train.__main__`, ..., `mtmoe.translate`) may import cli.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mtmoe"
LAYERS = [{"errors", "paths", "scoring"}, {"config"}, {"device"}, {"data"}, {"model"}, {"formats"},
          {"train", "export", "serve"}, {"eval"}, {"cli"}]
SHIMS = {"mtmoe.train.__main__", "mtmoe.eval.__main__", "mtmoe.export.__main__", "mtmoe.translate"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(mods: dict[str, Path]) -> list[tuple[str, str, str | None, int]]:
    """(importing module, imported module, imported name or None, line) for every import of an
    mtmoe or deepspeed module, at any depth of the file."""
    found = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(mod, a.name, None, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    target = f"{base}.{a.name}"
                    found.append((mod, target, None, node.lineno) if target in mods
                                 else (mod, base, a.name, node.lineno))
    return [f for f in found if f[1].split(".")[0] in ("mtmoe", "deepspeed")]


def owning_module(target: str, mods) -> str:
    while target not in mods and "." in target:
        target = target.rpartition(".")[0]
    return target


def top(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else ""


def layer(mod: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if top(mod) in names)


def test_every_package_has_a_layer():
    assert {top(m) for m in modules() if m != "mtmoe"} <= set().union(*LAYERS) | {"translate"}


def test_no_import_cycles():
    mods = modules()
    edges = defaultdict(set)
    for src, target, _, _ in imports(mods):
        target = owning_module(target, mods)
        if target.startswith("mtmoe") and target != src and src != "mtmoe":
            edges[src].add(target)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(mods):
        if v not in index:
            visit(v)
    assert not cycles


def test_imports_go_down_the_layers():
    mods = modules()
    wrong = []
    for src, target, _, line in imports(mods):
        target = owning_module(target, mods)
        if src in SHIMS or src == "mtmoe" or not target.startswith("mtmoe.") or top(src) == top(target):
            continue
        if layer(target) >= layer(src):
            wrong.append(f"{src}:{line} imports {target}")
    assert not wrong


def test_no_private_names_across_packages_and_model_is_plain_torch():
    mods = modules()
    private = [f"{src}:{line} imports {name} from {target}" for src, target, name, line in imports(mods)
               if name and name.startswith("_") and target.startswith("mtmoe") and top(src) != top(target)]
    assert not private
    deepspeed_in_model = [f"{src}:{line}" for src, target, _, line in imports(mods)
                          if top(src) == "model" and target.split(".")[0] == "deepspeed"]
    assert not deepspeed_in_model
