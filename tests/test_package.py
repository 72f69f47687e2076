"""The package's shape: no import cycle between lmtools' modules, the training path apart from
the report code, and a top level that stays small. Read from the source (ast), every import
counted, those inside functions too (only `if TYPE_CHECKING:` blocks, which never run, are not).
"""

import ast
import subprocess
import sys
from pathlib import Path

import lmtools

PACKAGE = Path(lmtools.__file__).parent
# The commands' report code: what the training path must never import.
REPORTS = {"lmtools.inspection", "lmtools.generate", "lmtools.scoring", "lmtools.plot", "lmtools.demo"}
TRAINING_PATH = ("lmtools.training.", "lmtools.data.", "lmtools.config.", "lmtools.runtime.", "lmtools.checkpoint")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of lmtools -> the modules of lmtools it imports."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        stack = [ast.parse(path.read_text(encoding="utf-8"))]
        while stack:
            node = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if (
                    isinstance(child, ast.ImportFrom)
                    and child.level == 0
                    and (child.module or "").startswith("lmtools")
                ):
                    for alias in child.names:
                        sub = f"{child.module}.{alias.name}"
                        found.add(sub if sub in modules else child.module)
                elif isinstance(child, ast.Import):
                    found.update(a.name for a in child.names if a.name.startswith("lmtools"))
                stack.append(child)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_module_of_lmtools_imports_itself_back():
    assert cycles(imports()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_training_path_never_imports_the_report_code():
    graph = imports()
    reached = {m: graph[m] & REPORTS for m in graph if m.startswith(TRAINING_PATH)}
    assert {m: r for m, r in reached.items() if r} == {}


def test_the_top_level_holds_at_most_a_dozen_modules_and_the_packages_by_role():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert len(top) <= 12, sorted(top)
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"cli", "config", "data", "interop", "runtime", "training"}


def test_the_imports_kept_inside_functions_keep_torch_out_of_start_up():
    """Why the function-level imports that remain exist: `lmtools --help` (every command's module
    and the demo), `prepare` and `inspect` of token files start without torch."""
    code = (
        "import sys, lmtools.cli, lmtools.data.prepare, lmtools.inspection\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('lmtools'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
