"""The layering of ../shared/DESIGN.md, read from the source: every import in llm/, those inside
functions included, must point down the layers, and no modules may import each other in a cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm"

# layer -> the llm packages it must never import
FORBIDDEN = {
    "llm.kernels": ["llm.models", "llm.data", "llm.tasks", "llm.adapt", "llm.compress", "llm.train"],
    "llm.models": ["llm.data", "llm.tasks", "llm.adapt", "llm.compress", "llm.train"],
    "llm.data": ["llm.models", "llm.tasks", "llm.adapt", "llm.compress", "llm.train"],
    "llm.tasks": ["llm.train", "llm.adapt", "llm.compress"],
    "llm.adapt": ["llm.train", "llm.tasks", "llm.data", "llm.compress"],
    # compress uses models, data, kernels, tasks and adapt (it registers its transforms there), never the loop
    "llm.compress": ["llm.train"],
    "llm.train": ["llm.tasks", "llm.adapt", "llm.compress", "llm.data"],
}
COMMAND_LAYER = ("llm.cli", "llm.__main__", "llm.bench")  # may import anything
BASE = ("llm.config", "llm.errors", "llm.log", "llm.fileio", "llm")  # import no other llm module
ABOVE_EVERYTHING = ("llm.run", "llm.cli", "llm.bench")  # nothing below the command layer imports these


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every llm module `path` imports, at top level or inside functions, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in the module itself
                found.add(base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_forbidden_arrow():
    wrong = []
    for module, targets in graph().items():
        if any(within(module, c) for c in COMMAND_LAYER):
            continue
        for target in targets:
            if module in BASE and target not in BASE:
                wrong.append(f"{module} -> {target} (a base module imports no other llm module)")
            if not within(module, "llm.run") and any(within(target, a) for a in ABOVE_EVERYTHING):
                wrong.append(f"{module} -> {target} (only the command layer imports the assembly or the CLI)")
            for layer, banned in FORBIDDEN.items():
                if within(module, layer) and any(within(target, b) for b in banned):
                    wrong.append(f"{module} -> {target} ({layer} must not know {target.rsplit('.', 1)[0]})")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                loop = path[path.index(nxt) :] if nxt in path else []
                cycles.append(" -> ".join(loop + [node, nxt]))
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_the_command_line_imports_only_the_assembly_and_base_modules():
    """cli.py calls llm.run's functions (it imports each by name when its command runs), and reads no
    other layer: no data, model or training code of its own."""
    allowed = {"llm", "llm.config", "llm.errors", "llm.log"}
    wrong = {m for m in graph()["llm.cli"] if m not in allowed and not within(m, "llm.run")}
    assert not wrong, wrong


def test_compress_transforms_reach_the_loader_through_the_adapt_registry():
    """adapt knows no compress; compress adds its transforms to adapt's registry, and the loader
    imports compress, so a saved quantized or pruned model is rebuilt wherever models are loaded."""
    edges = graph()
    assert not any(within(t, "llm.compress") for m, ts in edges.items() if within(m, "llm.adapt") for t in ts)
    assert "llm.adapt" in edges["llm.compress"]
    assert any(within(t, "llm.compress") for t in edges["llm.run.loader"])


def test_the_reader_sees_imports_inside_functions(tmp_path):
    """The guard itself: an import hidden in a function body counts."""
    edges = graph()
    assert "llm.bench.kernels" in edges["llm.run.bench"]  # imported inside kernels()
    assert "llm.tasks.hf" in edges["llm.run.loader"]  # imported inside load_model
