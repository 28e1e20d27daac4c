"""The package's layers import only downward: no upward import, no import cycle, no transformers below layer 3.

Every module of ``transformers_kvquant/`` (the kernels included: ``transformers_kvquant/kernels``) is parsed
with ``ast``, never imported, so imports inside functions count too. docs/architecture.md describes the layers;
rerun with ``pytest tests/test_architecture.py``.
"""

from __future__ import annotations

import ast

import pytest

from tests.helpers import REPO

PACKAGE = "transformers_kvquant"
SOURCES = {REPO / PACKAGE: PACKAGE}  # folder -> the package it ships as

# The layers, bottom to top, written once: a module belongs to the longest entry that is its name or a parent of it.
LAYERS = {
    f"{PACKAGE}._version": (0, "the version string"),
    f"{PACKAGE}.kernels": (1, "kernels"),
    f"{PACKAGE}.quant": (2, "quantization core"),
    f"{PACKAGE}.calibration": (3, "calibration"),
    f"{PACKAGE}.config": (4, "config + hub"),
    f"{PACKAGE}.integration": (5, "transformers integration"),
    f"{PACKAGE}.evaluation": (6, "user surface"),
    f"{PACKAGE}.cli": (6, "user surface"),
    f"{PACKAGE}.models": (6, "user surface"),
    f"{PACKAGE}.demo": (6, "user surface"),
}
ROOT = (7, "package root (the public API)")  # the root re-exports every layer; nothing inside imports it
NO_TRANSFORMERS_UP_TO = 2  # kernels and the quantization core never import transformers
SELF_CONTAINED = f"{PACKAGE}.kernels"  # the kernels import nothing of the package outside themselves


def module_sources() -> dict[str, tuple[str, bool]]:
    """``{module name: (source, is_package)}`` of every module under ``SOURCES``."""
    out = {}
    for folder, prefix in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join([prefix, *(parts[:-1] if is_package else parts)])
            out[name] = (path.read_text(encoding="utf-8"), is_package)
    return out


def layer_of(module: str) -> tuple[int, str] | None:
    if module == PACKAGE:
        return ROOT
    owners = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(owners, key=len)] if owners else None


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """Absolute names of every module that ``module`` imports, anywhere in its code (functions included).

    ``from X import Y`` imports the module ``X.Y`` when there is one, else ``X``; relative imports are resolved.
    """
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def problems(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every broken rule, as a sentence naming the importing module, the imported one and their layers."""
    known = set(sources)
    found, graph = [], {}

    def where(m: str) -> str:
        number, name = layer_of(m)
        return f"{m} (layer {number}, {name})"

    for module, (source, is_package) in sorted(sources.items()):
        if layer_of(module) is None:
            found.append(f"{module} has no layer: add its folder to LAYERS in tests/test_architecture.py")
            continue
        graph[module] = set()
        for target in sorted(imports_of(module, source, is_package, known)):
            if target == "transformers" or target.startswith("transformers."):
                if layer_of(module)[0] <= NO_TRANSFORMERS_UP_TO:
                    found.append(f"{where(module)} imports {target}: layers 1-{NO_TRANSFORMERS_UP_TO} must not import transformers")
                continue
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue  # the standard library and third-party packages
            inside = [k for k in known if target == k or target.startswith(k + ".")]
            if not inside:
                found.append(f"{module} imports {target}, which is not a module of the package")
                continue
            target = max(inside, key=len)
            if target == module:
                continue
            graph[module].add(target)
            if layer_of(target) is None:
                continue  # reported as a module without a layer
            if layer_of(target)[0] > layer_of(module)[0]:
                found.append(f"{where(module)} imports {where(target)}: an upward import")
            if module.startswith(SELF_CONTAINED + ".") and not (target == SELF_CONTAINED or target.startswith(SELF_CONTAINED + ".")):
                found.append(f"{where(module)} imports {where(target)}: kernels/ imports nothing of the package outside it")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle ``[a, b, ..., a]`` per strongly connected component of more than one module."""
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def connect(v):  # Tarjan's algorithm (the graph is a few dozen modules: recursion is fine)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    out = []
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats
            nxt = min(w for w in graph[path[-1]] if w in component)
            if nxt in seen:
                out.append(path[path.index(nxt) :] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return out


# ------------------------------------------------------------------------------------------------- the package
def test_the_package_imports_only_downward():
    sources = module_sources()
    assert f"{PACKAGE}.kernels.layout" in sources and f"{PACKAGE}.integration.cache" in sources and len(sources) > 40
    found = problems(sources)
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------------------------- the checker
def synthetic(**modules: str) -> dict[str, tuple[str, bool]]:
    """``name__sub="source"`` -> ``{"transformers_kvquant.name.sub": (source, False)}``."""
    return {f"{PACKAGE}." + name.replace("__", "."): (source, False) for name, source in modules.items()}


def test_the_checker_finds_an_upward_import_inside_a_function():
    found = problems(synthetic(quant__store="def f():\n    from ..config.errors import KVQuantConfigError\n", config__errors=""))
    assert found == [
        f"{PACKAGE}.quant.store (layer 2, quantization core) imports {PACKAGE}.config.errors (layer 4, config + hub): an upward import"
    ]


def test_the_checker_finds_an_import_of_the_root():
    sources = {**synthetic(cli__main="from transformers_kvquant import KVQuantCache\n"), PACKAGE: ("", True)}
    assert problems(sources) == [f"{PACKAGE}.cli.main (layer 6, user surface) imports {PACKAGE} (layer 7, package root (the public API)): an upward import"]


def test_the_checker_finds_a_cycle_within_a_layer():
    found = problems(synthetic(config__a="from . import b\n", config__b="from .a import x\n"))
    assert found == [f"import cycle: {PACKAGE}.config.a -> {PACKAGE}.config.b -> {PACKAGE}.config.a"]


@pytest.mark.parametrize("layer", ["kernels", "quant"])
def test_the_checker_finds_transformers_below_the_calibration(layer):
    found = problems(synthetic(**{f"{layer}__x": "def f():\n    from transformers.cache_utils import Cache\n"}))
    assert len(found) == 1 and f"{PACKAGE}.{layer}.x" in found[0] and "must not import transformers" in found[0]


def test_the_checker_keeps_the_kernels_self_contained():
    found = problems(synthetic(kernels__x="from .._version import __version__\n", _version=""))
    assert len(found) == 1 and "kernels/ imports nothing of the package outside it" in found[0]


def test_the_checker_asks_for_a_layer_for_a_new_folder():
    assert problems(synthetic(plugins__x="")) == [f"{PACKAGE}.plugins.x has no layer: add its folder to LAYERS in tests/test_architecture.py"]


def test_no_folder_at_the_repository_root_shadows_an_installed_package():
    """``python -m ...`` (``make demo``) and pytest put the repository root on ``sys.path``: a top-level package there
    named like an installed distribution's module would shadow it. It happened: the kernels lived in ``kernels/``,
    and transformers 5.25 imports Hugging Face's ``kernels`` package when it is installed."""
    import importlib.metadata as md

    installed = set()
    for dist in md.distributions():
        top = dist.read_text("top_level.txt")
        installed.update(top.split() if top else [(dist.metadata["Name"] or "").replace("-", "_").lower()])
    ours = {p.stem for p in REPO.iterdir() if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert "kernels" not in ours  # the name of Hugging Face's package, whether or not it is installed here
    clash = ours & (installed - {PACKAGE, "tests"})
    assert not clash, f"top-level packages of the repository shadow installed ones: {sorted(clash)}"
