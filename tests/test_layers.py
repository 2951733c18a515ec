"""The package's imports flow one way: each module imports only modules of the layers below it.

Read from the source with `ast` (nothing is imported), so a new module or a new import
that points upwards fails here with the module, the line and the layer it reached.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / "jlora"

# Bottom to top. A module may import any module of an earlier layer, and, inside its own
# layer, a module listed before it (so no two modules of a layer import each other).
LAYERS = {
    "leaf types and config": ["_version", "_primitives", "_config", "_variants", "_layout", "_quant"],
    "tree helpers": ["_paths", "_trace"],
    "the plan": ["_plan", "_infer"],
    "what the verbs are made of": ["_knobs", "_rewrite", "_sharding"],
    "verbs": ["_init", "_merge", "_quantize", "_dylora", "_bank", "_optimizer", "_combine", "_summary",
              "_wrap"],
    "I/O": ["_checkpoint", "_foreign", "_peft", "_gguf", "_cli"],
    "entry points": ["__init__", "__main__"],
}
ORDER = [m for modules in LAYERS.values() for m in modules]
LAYER_OF = {m: layer for layer, modules in LAYERS.items() for m in modules}


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"jlora/{module}.py")


def _jlora_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """``(module, line)`` of every import of a jlora module, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jlora":
            parts = node.module.split(".")
            if len(parts) > 1:
                out.append((parts[1], node.lineno))
            else:  # from jlora import _x
                out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.Import):
            out.extend((alias.name.split(".")[1], node.lineno) for alias in node.names
                       if alias.name.startswith("jlora."))
    return out


def test_every_module_has_a_layer():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert sorted(ORDER) == modules, "place each new module of jlora/ in LAYERS (and drop removed ones)"


@pytest.mark.parametrize("module", ORDER)
def test_imports_point_down(module):
    upward = [f"jlora/{module}.py:{line} imports {target} ({LAYER_OF.get(target, 'no layer')}) from "
              f"{LAYER_OF[module]}" for target, line in _jlora_imports(_tree(module))
              if target not in ORDER or ORDER.index(target) >= ORDER.index(module)]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module", ORDER)
def test_no_import_inside_a_function(module):
    late = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            late += [f"jlora/{module}.py:{inner.lineno} in {node.name}()" for inner in ast.walk(node)
                     if isinstance(inner, ast.Import | ast.ImportFrom)]
    assert not late, "imports belong at the top of the module: " + ", ".join(late)


def test_the_check_sees_an_upward_import():
    tree = ast.parse("from jlora._wrap import wrap\nimport jlora._cli\n\n"
                     "def f():\n    from jlora import _peft\n")
    assert _jlora_imports(tree) == [("_wrap", 1), ("_cli", 2), ("_peft", 5)]
