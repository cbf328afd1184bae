"""The package's shape: the import graph flows one way, imports sit at module top, modules stay readable."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cct"
MODULES = sorted(p for p in SRC.rglob("*.py"))
LAZY_ALLOWED = {"cli.py", "__main__.py", "console.py"}  # may import subcommands lazily: `cct --help` fast, Ctrl-C clean


def _name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported cct module, inside a function) for every import of the package's own modules."""
    tree = ast.parse(path.read_text())
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    module = f"{base}.{child.module}" if child.module else base
                else:
                    module = child.module or ""
                if module == "cct" or module.startswith("cct."):
                    targets = [f"{module}.{a.name}" for a in child.names]
                    found.extend((t if (SRC.parent / (t.replace(".", "/") + ".py")).exists() else module, in_function)
                                 for t in targets)
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name == "cct" or a.name.startswith("cct."))
            visit(child, inner)

    visit(tree, False)
    return [(m, f) for m, f in found if m != _name(path)]


def test_no_import_cycles():
    """TYPE_CHECKING and function-level imports count as edges too."""
    graph = {_name(p): {m for m, _ in _imports(p) if m != "cct"} for p in MODULES}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_own_imports_sit_at_module_top():
    inside = [(p.name, m) for p in MODULES if p.name not in LAZY_ALLOWED for m, f in _imports(p) if f]
    assert len(inside) <= 5, inside


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_modules_and_functions_stay_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 500
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno + 1 <= 150, f"{node.name} is {node.end_lineno - node.lineno + 1} lines"


def _python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter (what `import cct` loads depends on nothing imported before)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_and_help_without_the_resource_module():
    """`resource` is Unix-only: `import cct` and `cct --help` must not need it."""
    code = ("import sys; sys.modules['resource'] = None\n"
            "import cct, cct.bench, cct.cli\n"
            "try:\n    cct.cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'matplotlib' not in sys.modules and 'onnx' not in sys.modules and 'h5py' not in sys.modules")
    result = _python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train" in result.stdout and "eval" in result.stdout


def test_a_ctrl_c_while_the_command_loads_is_an_interruption_not_a_traceback():
    """`import cct` is light (its names load on first use), and the `cct` entry point (`cct.console`) catches a
    Ctrl-C during the second it takes torch and the package to load: here raised by that import itself."""
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def fake(name, *args, **kwargs):\n"
            "    if name == 'cli':\n        raise KeyboardInterrupt\n"
            "    return real(name, *args, **kwargs)\n"
            "import cct\nassert 'torch' not in sys.modules, 'import cct loaded torch'\n"
            "builtins.__import__ = fake\n"
            "from cct.console import main\nsys.exit(main())")
    result = _python(code)
    assert result.returncode == 130 and result.stderr == "cct: interrupted\n", result.stderr[-2000:]
    result = _python(code.replace("from cct.console import main\nsys.exit(main())",
                                  "import runpy\nrunpy.run_module('cct', run_name='__main__')"))  # python -m cct
    assert result.returncode == 130 and result.stderr == "cct: interrupted\n", result.stderr[-2000:]
    code = ("import cct\nassert cct.create_model('cct_2_3x2_32').cfg.embed_dim == 128 and 'create_model' in dir(cct)\n"
            "assert callable(cct.checkpoint.read_checkpoint) and callable(cct.kernels.fuse)  # submodules too\n"
            "try:\n    cct.nothing\nexcept AttributeError as e:\n    assert 'nothing' in str(e)\n"
            "else:\n    raise AssertionError('cct.nothing')")
    result = _python(code)
    assert result.returncode == 0, result.stderr[-2000:]
