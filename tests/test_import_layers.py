"""The package's layering, read from the source: no import circle between files, no import against the layers.

Layers, lowest first (CONTRIBUTING.md, "Module map"); a module imports only from its own layer or below:

  config < models, diffusion, runtime, clients < weights < data < assembly < train < inference < eval, convert, CLIs

A backbone family's folder (`ttm_jax/backbones/<family>/`) spreads over the layers by file role (`BACKBONE_ROLES`):
`config` at config's, `model`/`vae` at models', `weights`/`vae_weights`/`text_weights`/`export` at weights', `entry`
at assembly's, `torch_model` on top. The families are listed once, `ttm_jax/backbones/__init__.py: FAMILIES`; a
module that serves every family imports one role of each through `backbones.role_modules("<role>")`, at its top,
which this reader counts as an import of `ttm_jax.backbones.<family>.<role>` for every family (the one import by
name in the package).

Every `import` counts, at the top of a file or inside a function. A CLI module (`__main__.py`, `main.py`,
`describe.py`) is the top layer wherever it lives, and nothing may import it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ttm_jax"

LAYERS = (
    ("ttm_jax.config", "ttm_jax.cli", "ttm_jax.storage"),
    ("ttm_jax.models", "ttm_jax.diffusion", "ttm_jax.runtime", "ttm_jax.clients"),
    ("ttm_jax.weights",),
    ("ttm_jax.data",),
    ("ttm_jax.assembly",),
    ("ttm_jax.train",),
    ("ttm_jax.inference",),
    ("ttm_jax.eval", "ttm_jax.convert", "ttm_jax.torch", "ttm_jax.main", "ttm_jax.describe"),
)
CLI = ("ttm_jax.main", "ttm_jax.describe")
# A backbone family's folder (`ttm_jax/backbones/<family>/`) spans the layers: each file's layer is its role, the
# file's name, the same in every family (a new family adds files, not rows). The packages' `__init__`s import nothing.
BACKBONE_ROLES = {
    "config": 0,  # the family's config section and its checks (`ttm_jax.config` calls them)
    "model": 1, "vae": 1,  # the Flax modules
    "weights": 2, "vae_weights": 2, "text_weights": 2, "export": 2,  # torch <-> Flax rules, the TTM export
    "entry": 4,  # the registry entry (`assembly/registry.py` registers it)
    "torch_model": len(LAYERS) - 1,  # the PyTorch model (an optional extra, like `ttm_jax.torch`)
}


def families() -> dict[str, str]:
    """`ttm_jax/backbones/__init__.py: FAMILIES` ({backbone name: folder}), read from the source."""
    tree = ast.parse((ROOT / "backbones" / "__init__.py").read_text())
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "FAMILIES":
            return ast.literal_eval(node.value)
    raise AssertionError("ttm_jax/backbones/__init__.py: no FAMILIES")


def _role_calls(tree: ast.AST) -> list[tuple[ast.Call, str | None]]:
    """Every `role_modules(...)` call (`backbones.role_modules` or the bare name) and its role, None unless a string
    literal."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name == "role_modules":
                arg = node.args[0] if node.args else None
                role = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
                out.append((node, role))
    return out


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: pathlib.Path, known: set[str]) -> list[tuple[str, int]]:
    """`(imported ttm_jax module, line)` for every import in the file; `from pkg import name` is the submodule
    `pkg.name` when that is a module, else `pkg`; `role_modules("<role>")` imports every family's `<role>` file."""
    tree = ast.parse(path.read_text(), str(path))
    out = [(f"ttm_jax.backbones.{folder}.{role}", call.lineno) for call, role in _role_calls(tree)
           for folder in families().values()]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("ttm_jax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ttm_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in known else node.module, node.lineno))
    return [(m, line) for m, line in out if m in known]


def rank(name: str) -> int:
    if name.endswith(".__main__") or name in CLI:
        return len(LAYERS)  # above everything
    if name == "ttm_jax":
        return 0  # the package's __init__ (imports nothing)
    parts = name.split(".")
    if parts[:2] == ["ttm_jax", "backbones"]:
        if len(parts) <= 3:
            return 0  # `ttm_jax.backbones`, `ttm_jax.backbones.<family>`: docstrings only
        if parts[3] not in BACKBONE_ROLES:
            raise AssertionError(f"{name}: not a backbone file role; name it one of {sorted(BACKBONE_ROLES)} "
                                 f"(tests/test_import_layers.py: BACKBONE_ROLES)")
        return BACKBONE_ROLES[parts[3]]
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name}: in no layer; add its package to LAYERS (tests/test_import_layers.py) and to the "
                         f"module map in CONTRIBUTING.md")


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        rank(name)


def test_no_import_against_the_layers(graph):
    bad = [f"{a} (layer {rank(a)}) imports {b} (layer {rank(b)}) at line {line}"
           for a, deps in graph.items() for b, line in deps if rank(b) > rank(a)]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_family_config_imports_no_config_package(graph):
    """`ttm_jax.config` imports each family's `config.py` (`families.FAMILY_CONFIGS`, the U-Net's `section` in the
    variants): were one to import a `ttm_jax.config` module, importing it first would run the package's `__init__`,
    which imports it back half-built. It imports `ttm_jax.cli` (`ConfigError`, `check_config`)."""
    bad = [f"{a} imports {b} at line {line}" for a, deps in graph.items() for b, line in deps
           if a.startswith("ttm_jax.backbones.") and a.endswith(".config") and b.startswith("ttm_jax.config")]
    assert not bad, bad


def test_no_relative_imports():
    """`from . import x` would slip past the reader above: the package imports by absolute name only."""
    relative = [f"{name}:{n.lineno}" for name, path in modules().items()
                for n in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, f"relative imports: {relative}"


def test_inference_never_imports_train(graph):
    bad = [(a, b) for a, deps in graph.items() for b, _ in deps
           if a.startswith("ttm_jax.inference") and b.startswith("ttm_jax.train")]
    assert not bad


def test_package_imports_at_the_top():
    """No `ttm_jax` import hides in a function or block: with no circle left, none is needed (heavy optional
    third-party packages, e.g. torch, may still be imported where they are used)."""
    hidden = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        hidden += [f"{name}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                   and id(n) not in top and any(m.startswith("ttm_jax") for m in _names(n))]
    assert not hidden, f"ttm_jax imports inside functions: {hidden}"


def test_families_imported_at_the_top_by_literal_role():
    """`role_modules` is an import: called with a literal role (so the reader above knows what it imports) and at a
    module's top, never inside a function; and it is the package's only import by name (`importlib.import_module`,
    `__import__`), so no other import escapes the reader."""
    bad = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        hidden = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                  for n in ast.walk(f) if n is not f}
        bad += [f"{name}:{call.lineno}: role_modules(...) inside a function" for call, _ in _role_calls(tree)
                if id(call) in hidden]
        bad += [f"{name}:{call.lineno}: role_modules without a literal role" for call, role in _role_calls(tree)
                if role is None]
        if name != "ttm_jax.backbones":
            bad += [f"{name}:{n.lineno}: import by name" for n in ast.walk(tree) if isinstance(n, ast.Call)
                    and (getattr(n.func, "attr", None) == "import_module" or getattr(n.func, "id", None) in
                         ("import_module", "__import__"))]
    assert not bad, bad


def test_every_family_is_listed_with_its_fixed_names():
    """Every folder of `ttm_jax/backbones/` is a row of `FAMILIES` and back; each family's `config.py` defines
    `check(config)` and `grid_step(config)` (the config package's calls), its `entry.py` assigns `BACKBONE` (the
    registry's); the registry and the config package reach the families through `role_modules` alone."""
    fams = families()
    folders = {p.parent.name for p in (ROOT / "backbones").glob("*/__init__.py")}
    assert folders == set(fams.values()), (folders, fams)
    for folder in folders:
        config = ast.parse((ROOT / "backbones" / folder / "config.py").read_text())
        assert {"check", "grid_step"} <= {n.name for n in config.body if isinstance(n, ast.FunctionDef)}, folder
        entry = ast.parse((ROOT / "backbones" / folder / "entry.py").read_text())
        assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "BACKBONE" for t in n.targets)
                   for n in entry.body), folder
    mods = modules()
    known = set(mods)
    for name, role in (("ttm_jax.config.families", "config"), ("ttm_jax.assembly.registry", "entry")):
        deps = {m for m, _ in imports(mods[name], known)}
        assert {f"ttm_jax.backbones.{folder}.{role}" for folder in folders} <= deps, name
    for name in ("ttm_jax.config.checks", "ttm_jax.config.geometry", "ttm_jax.config.families"):
        text = mods[name].read_text()
        assert not any(f"ttm_jax.backbones.{folder}" in text for folder in folders), f"{name} names a family"


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]


def test_no_import_circle_between_files(graph):
    """Strongly connected components of the file graph (Tarjan): every one must be a single file."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph[v]:
            if w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles between files: {circles}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The reader sees imports inside functions and `from pkg import module`; the ranks order the layers."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ttm_jax.train import loop\n    import ttm_jax.config\n")
    got = imports(f, {"ttm_jax.train.loop", "ttm_jax.train", "ttm_jax.config"})
    assert got == [("ttm_jax.train.loop", 2), ("ttm_jax.config", 3)]
    f.write_text("from ttm_jax import backbones\nENTRIES = backbones.role_modules('entry')\n")
    entries = {f"ttm_jax.backbones.{folder}.entry" for folder in families().values()}
    got = imports(f, {"ttm_jax.backbones"} | entries)
    assert sorted(got) == sorted([("ttm_jax.backbones", 1)] + [(e, 2) for e in entries]) and len(entries) >= 2
    assert rank("ttm_jax.inference.pipeline") > rank("ttm_jax.train.loop") > rank("ttm_jax.assembly.inputs")
    assert rank("ttm_jax.data.prepare.__main__") > rank("ttm_jax.convert.export")
    assert rank("ttm_jax.data.caption") > rank("ttm_jax.clients.llm") < rank("ttm_jax.inference.run")
