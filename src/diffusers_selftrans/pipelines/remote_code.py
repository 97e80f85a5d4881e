# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""The remote-code export: `SiTPipeline.save_pretrained(folder, save_remote_code=True)` writes self-contained copies of
the pipeline's and its components' modules into the folder and points `model_index.json` at them, so that
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it with diffusers alone.

It imports nothing from this package (it reads the modules of the objects it is given), so the pipeline module, at the
bottom of the package, can take `BUILTIN_LIBRARIES` from here.
"""

import ast
import importlib
import importlib.util
import inspect
import json
import os
import sys
from typing import List, Union

# model_index.json libraries that diffusers imports itself: their components need no remote code.
BUILTIN_LIBRARIES = ("diffusers", "transformers", "onnxruntime.training")


def write_remote_code(pipeline, save_directory: Union[str, os.PathLike]):
    """Write standalone copies (package-relative imports inlined) of the pipeline module as `<stem>.py` and of every
    component module outside diffusers as `<component>/<stem>.py` into a `save_pretrained` folder, and point
    `model_index.json` at them (e.g. `"transformer": ["transformer_sit", "SiTTransformer2DModel"]`), so that
    `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it without this package."""
    index_path = os.path.join(save_directory, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(f"{index_path} not found; call `save_pretrained` on this folder first.")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)

    pipeline_module = sys.modules[type(pipeline).__module__]
    stem = pipeline_module.__name__.rsplit(".", 1)[-1]
    _write_text(os.path.join(save_directory, f"{stem}.py"), standalone_module_source(pipeline_module))
    index["_class_name"] = [stem, type(pipeline).__name__]
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        if entry[0] in BUILTIN_LIBRARIES:
            continue
        component = getattr(pipeline, name)
        module = sys.modules[type(component).__module__]
        stem = module.__name__.rsplit(".", 1)[-1]
        _write_text(os.path.join(save_directory, name, f"{stem}.py"), standalone_module_source(module))
        index[name] = [stem, type(component).__name__]
    _write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_text(path: str, text: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def standalone_module_source(module) -> str:
    """Source of `module` with every top-level package-relative import replaced by the definitions it brings in.

    For `from ..transport import score_from_velocity` the function is copied in, with the top-level functions,
    classes and constants of `transport` it uses, and the absolute imports they need. A module without relative
    imports (e.g. `transformer_sit.py`) comes back verbatim.
    """
    source = inspect.getsource(module)
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []
    for node in tree.body:
        if not (isinstance(node, ast.ImportFrom) and node.level > 0):
            continue
        target = importlib.import_module(
            importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__)
        )
        blocks, aliases = [], []
        for alias in node.names:
            obj = getattr(target, alias.name)
            home = sys.modules.get(getattr(obj, "__module__", None) or "", target)
            if inspect.ismodule(obj):
                raise ValueError(f"Cannot inline the module import {alias.name!r} in {module.__name__}.")
            blocks.append(_extract_definitions(standalone_module_source(home), [alias.name], home.__name__))
            if alias.asname and alias.asname != alias.name:
                aliases.append(f"{alias.asname} = {alias.name}\n")
        edits.append((node.lineno, node.end_lineno, "".join(blocks + aliases)))
    if not edits:
        return source
    for start, end, text in reversed(edits):
        lines[start - 1 : end] = [text]
    header = f"# Standalone copy of `{module.__name__}`: package-relative imports inlined by `save_remote_code`.\n"
    return header + "".join(lines)


def _extract_definitions(source: str, names: List[str], origin: str) -> str:
    """The top-level definitions `names` of `source`, everything top-level they use, and the imports those need."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    defs, imports = {}, {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name_node in ast.walk(target):
                    if isinstance(name_node, ast.Name):
                        defs[name_node.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                imports[(alias.asname or alias.name).split(".")[0]] = node
    needed_defs, needed_imports, todo = set(), set(), list(names)
    while todo:
        name = todo.pop()
        if name in imports:
            needed_imports.add(imports[name])
        if name not in defs or defs[name] in needed_defs:
            if name not in defs and name not in imports and name in names:
                raise ValueError(f"{name!r} is not a top-level definition of {origin}.")
            continue
        needed_defs.add(defs[name])
        todo.extend(n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name))

    def segment(node) -> str:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return "".join(lines[start - 1 : node.end_lineno])

    kept = [n for n in tree.body if n in needed_imports or n in needed_defs]  # in source order
    out = [f"# --- inlined from `{origin}` ---\n"]
    out += [segment(n) for n in kept if n in needed_imports] + ["\n\n"]
    out += [segment(n) + "\n\n" for n in kept if n in needed_defs]
    return "".join(out) + "# --- end of inlined code ---\n"
