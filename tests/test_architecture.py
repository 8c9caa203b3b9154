"""The package's shape, checked: subpackages by concept, no import circle, no private name
used outside its subpackage, fairseq imported only by the integration, and no side effect at
import beyond registering the task (a library user's UserError stays an ordinary exception)."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "fairseq_knnlm"


def modules():
    """{dotted module name: parsed tree} of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = (path, ast.parse(path.read_text()))
    return found


def imports(name, path, tree, known):
    """(imported module, imported names) of every import in a module, nested ones included."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, None) if sub in known else (target, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def test_no_import_circle():
    mods = modules()
    graph = {name: {t for t, _ in imports(name, path, tree, mods) if t in mods and t != name}
             for name, (path, tree) in mods.items()}
    # A package imports its own submodules to re-export them; a submodule that imports its
    # package's names closes no circle unless the package imports it back.
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def subpackage(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


def test_no_private_name_used_outside_its_subpackage():
    mods = modules()
    crossings = []
    for name, (path, tree) in mods.items():
        for target, imported in imports(name, path, tree, mods):
            if not target.startswith("fairseq_knnlm"):
                continue
            private = imported if imported is not None else target.rsplit(".", 1)[-1]
            if private.startswith("_") and not private.startswith("__") and subpackage(target) != subpackage(name):
                crossings.append(f"{name} imports {target}.{imported or ''}")
    assert not crossings, crossings


def test_only_the_integration_imports_fairseq():
    mods = modules()
    outside = sorted(
        name for name, (path, tree) in mods.items()
        if subpackage(name) != "integration"
        and any(t == "fairseq" or t.startswith("fairseq.") for t, _ in imports(name, path, tree, mods))
    )
    assert not outside, outside


def test_importing_the_package_changes_no_excepthook_and_user_errors_stay_exceptions():
    code = (
        "import sys\n"
        "before = sys.excepthook\n"
        "import fairseq_knnlm\n"
        "from fairseq_knnlm.integration import hub, generation\n"
        "assert sys.excepthook is before, sys.excepthook\n"
        "from fairseq_knnlm.errors import UserError\n"
        "try:\n"
        "    raise UserError('bad setting')\n"
        "except ValueError as e:\n"
        "    print('caught', e)\n"
        "raise UserError('uncaught')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "caught bad setting" in proc.stdout
    # An ordinary exception: Python's traceback and exit status 1, not the CLIs' one line and 2.
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "UserError: uncaught" in proc.stderr


def test_documented_import_paths_still_work():
    from fairseq_knnlm.adaptive import RetrievalPredictor
    from fairseq_knnlm.cache import cache_log_probs
    from fairseq_knnlm.datastore import Datastore
    from fairseq_knnlm.generation import attach_knnlm, from_pretrained, knnlm_task_overrides
    from fairseq_knnlm.neighbors import NeighborsWriter, read_neighbors
    from fairseq_knnlm.retrieval.adaptive import RetrievalPredictor as moved_predictor
    from fairseq_knnlm.storage.datastore import Datastore as moved_datastore

    assert Datastore is moved_datastore and RetrievalPredictor is moved_predictor
    assert all(callable(f) for f in (cache_log_probs, attach_knnlm, from_pretrained, knnlm_task_overrides,
                                     NeighborsWriter, read_neighbors))


def test_every_subpackage_has_a_line_in_the_readme_layout():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Repository layout"):]
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    missing = [name for name in subpackages if f"`fairseq_knnlm/{name}/`" not in layout]
    assert not missing, missing
    assert set(subpackages) == {"cli", "index", "integration", "retrieval", "scoring", "storage", "sweep", "tools"}
