"""The layering of ../shared/DESIGN.md, read from the source: every import in llm/, those inside
functions included, must point down the layers, and no modules may import each other in a cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm"

# layer -> the llm packages it must never import
FORBIDDEN = {
    "llm.kernels": ["llm.models", "llm.data", "llm.tasks", "llm.adapt", "llm.compress", "llm.transforms", "llm.train"],
    "llm.models": ["llm.data", "llm.tasks", "llm.adapt", "llm.compress", "llm.transforms", "llm.train"],
    "llm.data": ["llm.models", "llm.tasks", "llm.adapt", "llm.compress", "llm.transforms", "llm.train"],
    "llm.tasks": ["llm.train", "llm.adapt", "llm.compress", "llm.transforms"],
    "llm.adapt": ["llm.train", "llm.tasks", "llm.data", "llm.compress", "llm.transforms"],
    # compress uses models, data, kernels, tasks and adapt (a transform's interface), never the loop
    "llm.compress": ["llm.train", "llm.transforms"],
    # the list of every transform: adapt's and compress's
    "llm.transforms": ["llm.train"],
    "llm.train": ["llm.tasks", "llm.adapt", "llm.compress", "llm.transforms", "llm.data"],
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


def test_transforms_are_listed_explicitly_and_the_loader_knows_none():
    """adapt knows no compress and importing compress registers nothing; llm.transforms lists every
    transform (it imports both), and the loader reaches them only through it."""
    edges = graph()
    assert not any(within(t, "llm.compress") for m, ts in edges.items() if within(m, "llm.adapt") for t in ts)
    assert edges["llm.compress"] == set()
    assert {"llm.adapt", "llm.compress.prune", "llm.compress.quantize"} <= edges["llm.transforms"]
    assert "llm.transforms" in edges["llm.run.loader"]
    assert not any(within(t, "llm.compress") for t in edges["llm.run.loader"])


def test_the_reader_sees_imports_inside_functions(tmp_path):
    """The guard itself: an import hidden in a function body counts."""
    edges = graph()
    assert "llm.bench.kernels" in edges["llm.run.bench"]  # imported inside kernels()
    assert "llm.tasks.hf" in edges["llm.run.loader"]  # imported inside load_model


def family_names() -> dict[str, tuple[str, set[str]]]:
    """family -> (the module of its Hugging Face adapter, the names that stand for the family:
    its ModelConfig.family, its Hugging Face model types and architectures)."""
    from llm.models.hf import ADAPTERS

    return {f: (type(a).__module__, {f, *a.model_types, *a.architectures}) for f, a in ADAPTERS.items()}


def branches_on(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each place in `tree` that tests a value against one of `names`: a comparison
    (`==`, `!=`, `in`, `not in`, also against a literal tuple, list or set holding the name), a
    `match` case, or a subscript by the name (`TABLE["gpt"]`)."""

    def literals(node: ast.AST) -> list[ast.Constant]:
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return [n for n in items if isinstance(n, ast.Constant) and n.value in names]

    found = []
    for node in ast.walk(tree):
        hits = []
        if isinstance(node, ast.Compare):
            hits = [c for operand in (node.left, *node.comparators) for c in literals(operand)]
        elif isinstance(node, ast.match_case):
            hits = [p.value for p in ast.walk(node.pattern) if isinstance(p, ast.MatchValue)]
            hits = [c for h in hits for c in literals(h)]
        elif isinstance(node, ast.Subscript) and not (isinstance(node.value, ast.Name) and node.value.id == "Literal"):
            hits = literals(node.slice)  # a type `Literal["gpt", ...]` declares, a lookup `TABLE["gpt"]` branches
        found += [(c.lineno, c.value) for c in hits]
    return found


def test_no_module_outside_a_familys_adapter_branches_on_its_name():
    """Adding a family is its adapter (llm/models/hf/<family>.py) and its tests: no other module may
    branch on the family's name (its ModelConfig.family, Hugging Face model types or architectures;
    see `branches_on`). A declaration is not a branch: a tuple, set or dict that names families,
    bound once at module or class level (`families = ("gpt", "llama")` in a task, PIXEL_FAMILIES
    beside ModelConfig, an adapter's `architectures`), states a property of those families, and
    code asks for the property (`cfg.family in self.families`, `cfg.is_image`) instead of a name."""
    families = family_names()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, tree = module_name(path), ast.parse(path.read_text(), str(path))
        for family, (adapter, names) in families.items():
            if module != adapter:
                rel = path.relative_to(ROOT)
                wrong += [f"{rel}:{line}: branches on {name!r} ({family})" for line, name in branches_on(tree, names)]
    assert not wrong, "\n".join(wrong)


def test_the_family_guard_sees_each_kind_of_branch():
    """The guard itself: comparisons, membership in a literal, match cases and lookups by name count;
    declarations and tests of a declared property do not."""
    source = """
Family = Literal["gpt", "llama"]
FAMILIES = ("gpt", "llama")
TABLE = {"bert": 1}
if cfg.family == "gpt": pass
if "llama" != cfg.family: pass
if cfg.family in ("bert", "other"): pass
x = TABLE["vit"]
match cfg.family:
    case "gpt2" | "other": pass
if cfg.family in FAMILIES or cfg.is_image: pass
"""
    found = branches_on(ast.parse(source), {"gpt", "llama", "bert", "vit", "gpt2"})
    assert [n for _, n in sorted(found)] == ["gpt", "llama", "bert", "vit", "gpt2"]  # one per branch, none else
