"""Load a script of `benchmarks/` or `examples/` as a module by its path (the scripts are not a package)."""

import importlib.util
from pathlib import Path


def load_script(path, name=None):
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
