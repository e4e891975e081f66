"""The floors of the package hold (docs/architecture.md, "Floors").

- The layers contract of pyproject.toml (import-linter, every import, in a function or not): the ground
  floor `burnin.core` imports nothing above it, and the rank side and the supervisor side never import
  each other.
- No circle of modules.
- Below the two entry points (`burnin.cli`, the pytest plug-in), an import inside a function is there
  only to keep a heavy module (torch, matplotlib, numpy, scipy, triton) out of a process that does not
  need it, and says so with a `# lazy:` comment.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent / "burnin"
HEAVY = {"torch", "matplotlib", "numpy", "scipy", "triton", "lightning"}
#: The entry points import per command, so that `burnin --help` and a pytest session without scenarios
#: stay cheap (importing every command's modules at once costs ~2 s).
ENTRY_POINTS = {"burnin.cli", "burnin.pytest_plugin"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, module: str, modules: dict[str, Path]) -> list[tuple[ast.stmt, list[str], bool]]:
    """Every import statement of a module: (node, the modules it names, whether it runs in a function)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        in_function, guarded = False, False
        up = node
        while up in parents:
            up = parents[up]
            if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function = True
            if isinstance(up, ast.If) and "TYPE_CHECKING" in ast.unparse(up.test):
                guarded = True
            if isinstance(up, ast.Try) and any(h.type is not None and "ImportError" in ast.unparse(h.type)
                                               for h in up.handlers):
                guarded = True  # an optional dependency
        if not guarded:
            found.append((node, names, in_function))
    return found


def test_the_layers_contract_is_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "floors KEPT" in out.stdout


def test_no_circle_of_modules() -> None:
    graph = grimp.build_graph("burnin", exclude_type_checking_imports=True)
    circles = []
    for module in sorted(graph.modules):
        for other in graph.find_modules_directly_imported_by(module):
            if other != module and graph.chain_exists(importer=other, imported=module):
                circles.append((module, other))
    assert circles == []


def test_imports_inside_functions_keep_a_heavy_module_out_and_say_so() -> None:
    modules = _modules()
    top: dict[str, set[str]] = {}
    inner: list[tuple[str, int, list[str], str]] = []
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        top[name] = set()
        for node, names, in_function in _imports(path, name, modules):
            if in_function:
                inner.append((name, node.lineno, names, lines[node.lineno - 1]))
            else:
                top[name].update(names)

    memo: dict[str, bool] = {}

    def heavy(target: str, seen: frozenset[str] = frozenset()) -> bool:
        if not target.startswith("burnin"):
            return target.split(".")[0] in HEAVY
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in memo:
            return memo[target]
        if target in seen:
            return False
        parents = [".".join(target.split(".")[:i]) for i in range(1, target.count(".") + 1)]
        memo[target] = any(heavy(t, seen | {target}) for t in [*parents, *sorted(top.get(target, ()))])
        return memo[target]

    wrong = [f"{m}:{line}: {text.strip()}" for m, line, names, text in inner
             if m not in ENTRY_POINTS and not (all(heavy(n) for n in names) and "# lazy:" in text)]
    assert wrong == [], "\n".join(wrong)
