"""scripts/gpu_wheelhouse.sh carries to the lent GPU machine exactly what llm needs that its image lacks.

The wheelhouse is built here (PyPI; deepspeed from its sdist, about 10 s in all) and installed the
way benchmarks/gpu_suite.sh does, for the machine's Python (CPython 3.12, manylinux x86-64):
then the installed distributions are checked against scripts/gpu_wheelhouse.txt (the image's
package list and the carried pins) and against what llm imports, following every carried
package's requirements.
"""

import ast
import email.parser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "scripts" / "gpu_wheelhouse.txt"
TARGET = ["--python-version", "3.12", "--only-binary=:all:", "--platform", "manylinux2014_x86_64"]
# The lent machine's interpreter, for evaluating requirement markers.
TARGET_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
# Imports whose distribution is not the one of their top-level module.
INDIRECT = {"torch.utils.tensorboard": "tensorboard"}
CARRIED_KINDS = ("wheel", "sdist", "override")


def read_list() -> dict[str, dict[str, str | None]]:
    """{kind: {canonical distribution name: pinned version or None}} from scripts/gpu_wheelhouse.txt."""
    kinds: dict[str, dict[str, str | None]] = {}
    for number, line in enumerate(LIST.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        kind, names = words[0], words[1:]
        assert kind in (*CARRIED_KINDS, "image", "optional"), f"{LIST}:{number}: unknown kind {kind!r}"
        for name in names:
            dist, _, version = name.partition("==")
            kinds.setdefault(kind, {})[canonicalize_name(dist)] = version or None
    return kinds


def carried(kinds) -> dict[str, str]:
    return {name: version for kind in CARRIED_KINDS for name, version in kinds.get(kind, {}).items()}


def llm_imports() -> set[str]:
    """Every absolute import in llm/ (those inside functions too), as dotted names."""
    names = set()
    for path in (ROOT / "llm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def install_requires() -> list[Requirement]:
    """setup.py's install_requires, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [Requirement(r) for r in ast.literal_eval(node.value)]
    raise AssertionError("setup.py: no install_requires")


def needed_distributions(kinds) -> dict[str, str]:
    """{distribution llm needs on the GPU machine: why}, from llm's imports and setup.py."""
    owners = importlib.metadata.packages_distributions()  # module -> distributions, in this environment
    optional = kinds.get("optional", {})
    needed: dict[str, str] = {}
    for name in sorted(llm_imports()):
        top = name.split(".")[0]
        if top == "llm" or top in sys.stdlib_module_names:
            continue
        for prefix, dist in INDIRECT.items():
            if name == prefix or name.startswith(prefix + "."):
                needed.setdefault(dist, f"llm imports {name}")
        if canonicalize_name(top) in optional:
            continue
        assert top in owners, f"llm imports {name}: not installed here and not optional in {LIST.name}"
        for dist in owners[top]:
            needed.setdefault(canonicalize_name(dist), f"llm imports {top}")
    for req in install_requires():
        if req.marker is None or req.marker.evaluate(TARGET_MARKERS):
            needed.setdefault(canonicalize_name(req.name), "setup.py install_requires")
    return needed


def read_metadata(target: Path) -> dict[str, email.message.Message]:
    found = {}
    for meta in target.glob("*.dist-info/METADATA"):
        message = email.parser.Parser().parsestr(meta.read_text())
        name = canonicalize_name(message["Name"])
        assert name not in found, f"two versions of {name} installed"
        found[name] = message
    return found


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """(wheel folder, install target, script output, seconds): built by the script, installed like the suite."""
    base = tmp_path_factory.mktemp("gpu-wheelhouse")
    wheels, target = base / "whl", base / "site"
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_wheelhouse.sh"), str(wheels)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
         str(target), *TARGET, *sorted(str(w) for w in wheels.glob("*.whl"))],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    return wheels, target, proc.stdout, seconds


def test_script_fills_one_pinned_wheel_per_entry_under_40_mib(wheelhouse):
    wheels, _, stdout, seconds = wheelhouse
    print(f"wheelhouse built in {seconds:.1f} s")
    last = stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"wheelhouse: (\d+) wheels, ([\d.]+) MiB in (.+)", last)
    assert match, stdout
    files = sorted(wheels.glob("*.whl"))
    assert int(match[1]) == len(files) and Path(match[3]) == wheels
    total = sum(f.stat().st_size for f in files)
    assert float(match[2]) == pytest.approx(total / 2**20, abs=0.06) and total < 40 * 2**20

    pins = carried(read_list())
    got = {}
    for f in files:
        name, version, _, tags = parse_wheel_filename(f.name)
        assert name not in got, f"two wheels of {name}"
        got[name] = str(version)
        assert any(t.interpreter in ("py3", "cp312") and t.platform in ("any", "manylinux2014_x86_64") for t in tags)
    assert got == pins

    deepspeed = next(f for f in files if f.name.startswith("deepspeed-"))
    assert deepspeed.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(deepspeed) as z:
        assert not [n for n in z.namelist() if n.endswith((".so", ".pyd"))], "deepspeed built with ops"
        info = z.read("deepspeed/git_version_info_installed.py").decode()
    assert re.search(r"installed_ops=\{[^}]*\}", info) and "True" not in info.split("installed_ops=")[1].split("}")[0]


def test_installed_wheelhouse_covers_what_llm_needs_beyond_the_image(wheelhouse):
    _, target, _, _ = wheelhouse
    kinds = read_list()
    image, pins = set(kinds["image"]), carried(kinds)
    installed = read_metadata(target)
    assert {name: m["Version"] for name, m in installed.items()} == pins

    # Walk from what llm needs: the image provides a distribution, or the wheelhouse does and
    # then each of its requirements (for CPython 3.12 on Linux x86-64) is walked in turn.
    needed = needed_distributions(kinds)
    assert "deepspeed" in needed and "triton" in needed
    reached, todo = set(), list(needed)
    why = dict(needed)
    while todo:
        name = todo.pop()
        if name in pins:
            if name in reached:
                continue
            reached.add(name)
            for text in installed[name].get_all("Requires-Dist") or []:
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate(TARGET_MARKERS):
                    continue
                dep = canonicalize_name(req.name)
                why.setdefault(dep, f"{name} requires {text}")
                if dep in pins:
                    ok = req.specifier.contains(pins[dep], prereleases=True)
                    assert ok, f"{name} requires {text}, carried {pins[dep]}"
                todo.append(dep)
        else:
            assert name in image, f"{name} ({why[name]}) is neither in the image nor carried in {LIST.name}"
    assert reached == set(pins), f"carried but needed by nothing: {set(pins) - reached}"
    # Carrying what the image holds shadows it: only an override may, and a requirement must want it.
    assert set(pins) & image == set(kinds.get("override", {}))
    for name in kinds.get("override", {}):
        assert name in why and " requires " in why[name], f"override {name}: no carried package requires it"


def python312() -> str | None:
    candidates = [shutil.which("python3.12"), *sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))]
    for exe in filter(None, candidates):
        probe = subprocess.run([str(exe), "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                               capture_output=True, text=True)  # fmt: skip
        if probe.stdout.strip() == "True":
            return str(exe)
    return None


def test_carried_binary_wheels_import_on_python_312(wheelhouse):
    """What imports without torch (pydantic and its compiled core, hjson) does so on CPython 3.12."""
    _, target, _, _ = wheelhouse
    exe = python312()
    if exe is None:
        pytest.skip("no CPython 3.12 on this machine")
    code = "import hjson, pydantic; pydantic.TypeAdapter(int).validate_python('3'); print(pydantic.VERSION)"
    proc = subprocess.run([exe, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == carried(read_list())["pydantic"]


def test_llm_and_deepspeed_load_only_image_or_carried_packages():
    """Importing deepspeed and every llm module here loads nothing beyond the image and the wheelhouse.

    Packages installed here but absent there (mlflow, ...) are hidden, as on the image: an
    optional import of them (deepspeed's monitors try mlflow) then fails quietly, a needed one loudly."""
    kinds = read_list()
    allowed = set(kinds["image"]) | set(carried(kinds))
    owners = importlib.metadata.packages_distributions()
    hidden = sorted(
        top
        for top, dists in owners.items()
        if top != "llm" and top not in sys.stdlib_module_names and not {canonicalize_name(d) for d in dists} & allowed
    )
    code = r"""
import importlib, importlib.abc, json, os, pkgutil, sys

class Hide(importlib.abc.MetaPathFinder):
    hidden = set(json.loads(os.environ["HIDDEN_MODULES"]))

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the image)", name=name)
        return None

sys.meta_path.insert(0, Hide())
import deepspeed, llm
for info in pkgutil.walk_packages(llm.__path__, "llm."):
    if not info.name.endswith("__main__"):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:
            if e.name not in ("llm._C", "flash_attn", "apex"):
                raise
tops = {name.split(".")[0] for name in sys.modules}
print(json.dumps({name: getattr(sys.modules.get(name), "__file__", None) for name in sorted(tops)}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "HIDDEN_MODULES": json.dumps(hidden)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "deepspeed" in loaded and "pydantic" in loaded
    stdlib = sysconfig.get_paths()["stdlib"]
    outside = {}
    for module, file in loaded.items():
        if module == "llm" or module in sys.stdlib_module_names:
            continue
        if module not in owners and (
            file is None  # built in, or made at run time (Cython's cython_runtime)
            or (file.startswith(stdlib) and "-packages" not in file)  # _sysconfigdata_...
            or module.startswith("__editable___llm")  # an editable install's finder of llm itself
        ):
            continue
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        if not dists & allowed:
            outside[module] = sorted(dists) or file
    assert not outside, f"loaded, but neither in the image nor carried: {outside}"


def test_list_pins_every_carried_package():
    kinds = read_list()
    assert kinds["sdist"] == {"deepspeed": kinds["sdist"]["deepspeed"]}
    assert all(carried(kinds).values()), "every carried package needs NAME==VERSION"
