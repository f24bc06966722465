"""Every tools/ entry point runs from a plain clone (no `pip install -e`, as on a cluster node or a GPU machine fed
from scripts/wheelhouse.sh): the repository root goes on sys.path before anything of mae_det is imported, and the
known third-party warnings are filtered before the libraries that raise them load."""
import ast
from pathlib import Path

import pytest

TOOLS = sorted((Path(__file__).resolve().parents[2] / "tools").glob("*.py"))


def _first_line(tree: ast.Module, test) -> int:
    return min((n.lineno for n in ast.walk(tree) if test(n)), default=10**9)


@pytest.mark.parametrize("tool", TOOLS, ids=[t.name for t in TOOLS])
def test_repo_root_on_sys_path_before_mae_det_and_warnings_filtered_first(tool):
    tree = ast.parse(tool.read_text())
    path_insert = _first_line(tree, lambda n: isinstance(n, ast.Call) and ast.unparse(n.func) == "sys.path.insert"
                              and ast.unparse(n.args[0]) == "0"
                              and ast.unparse(n.args[1]) == "str(Path(__file__).resolve().parents[1])")
    def imports(n: ast.AST) -> list[str]:
        if isinstance(n, ast.ImportFrom):
            return [n.module or ""]
        return [a.name for a in n.names] if isinstance(n, ast.Import) else []

    mae_det_import = _first_line(tree, lambda n: any(m.startswith("mae_det") for m in imports(n)))
    # what can raise the known warnings: the libraries, and any part of mae_det that imports them
    heavy_import = _first_line(tree, lambda n: any(m.split(".")[0] in ("torch", "detectron2", "timm") or (
        m.startswith("mae_det") and m != "mae_det.utils.known_warnings") for m in imports(n)))
    filtered = _first_line(tree, lambda n: isinstance(n, ast.Call) and ast.unparse(n.func) == "filter_known_warnings")
    assert path_insert < mae_det_import < 10**9, f"{tool.name}: sys.path.insert(0, <repo root>) must come first"
    assert filtered < heavy_import, f"{tool.name}: filter_known_warnings() must run before the libraries load"
