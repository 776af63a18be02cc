"""Dependencies point down: no module imports from a package above it (docs/architecture.md).

Layers, top to bottom; a module may import from its own layer or any layer below. Checked on
the source's import statements (top-level and function-local), so a lazy import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "trustee"

LAYERS: list[set[str]] = [
    {"run", "eval", "report", "__main__"},
    {"train", "resume", "interrupt", "checkpoint", "metrics", "summary", "threads"},
    {"placement", "rollout", "learn", "models", "memory"},
    {"envs", "curriculum"},
    {"sim", "mcp"},
    {"engines", "chat"},
    {"types", "config", "gcpolicy", "paths", "atomic"},
]


def _layer(top: str) -> int:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"trustee.{top} has no layer in tests/test_layers.py; place it")


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trustee"):
            parts = node.module.split(".")
            if len(parts) == 1:  # from trustee import x
                out += [a.name for a in node.names]
            else:
                out.append(parts[1])
        elif isinstance(node, ast.Import):
            out += [a.name.split(".")[1] for a in node.names if a.name.startswith("trustee.")]
    return out


def test_no_package_imports_upward():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        top = rel.parts[0].removesuffix(".py")
        if top == "__init__":
            continue
        for dep in _imports(path):
            if _layer(dep) < _layer(top):
                bad.append(f"trustee/{rel} imports trustee.{dep}")
    assert bad == [], "upward imports:\n" + "\n".join(bad)


def test_the_evaluator_does_not_import_the_training_driver():
    """`trustee.eval` builds its engines through `trustee.placement.build_engine`, the function
    the training run's placement uses; it never reaches into the loop (`trustee.train`) or its
    resume and interrupt machinery."""
    bad = []
    for path in sorted((ROOT / "eval").rglob("*.py")):
        bad += [
            f"trustee/{path.relative_to(ROOT)} imports trustee.{d}"
            for d in _imports(path)
            if d in ("train", "resume", "interrupt")
        ]
    assert bad == [], "\n".join(bad)


def test_sim_imports_no_envs_and_rollout_no_sim():
    for path in (ROOT / "sim").rglob("*.py"):
        assert "envs" not in _imports(path), path
    for path in (ROOT / "rollout").rglob("*.py"):
        assert "sim" not in _imports(path), path


# Where a module or function may be longer, and why (none today).
LONG_ALLOWED: dict[str, str] = {}


def test_no_module_over_800_lines_and_no_function_over_80():
    """A module holds one idea and a function reads on one screen or two (STYLE.md)."""
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = f"trustee/{path.relative_to(ROOT)}"
        src = path.read_text()
        if src.count("\n") > 800 and rel not in LONG_ALLOWED:
            long.append(f"{rel}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80 and f"{rel}:{node.name}" not in LONG_ALLOWED:
                    long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert long == [], "too long (split it, or add it to LONG_ALLOWED with the reason):\n" + "\n".join(long)
