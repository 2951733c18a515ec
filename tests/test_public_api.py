"""The public surface: exactly the documented names, each documented."""

import inspect

import jlora


def test_all_names_are_exported_and_documented():
    assert sorted(jlora.__all__) == sorted([
        "CombineReport", "Layout", "LayoutError", "LoraApply", "LoraConfig", "NONLINEARITIES", "QArray",
        "Rule", "Use", "combine", "dequantize", "export_gguf", "export_peft", "import_gguf", "import_peft",
        "infer_layouts", "init",
        "merge", "optimizer", "put", "quantize", "rank_sweep", "read_metadata", "restore", "save",
        "save_args", "shardings", "stack", "summary", "truncate", "unmerge", "unstack", "wrap",
    ])
    for name in jlora.__all__:
        obj = getattr(jlora, name)
        assert inspect.getdoc(obj), name


def test_version():
    assert isinstance(jlora.__version__, str)
