# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Publishing a trained pipeline: model cards from the packaged `model_cards/` templates, the Hub upload, and the
remote-code export that lets `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` load a folder
without this package (`SiTPipeline.save_pretrained(..., save_remote_code=True)` calls `write_remote_code`).
"""

import ast
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Union

from .pipelines.pipeline_sit import _BUILTIN_LIBRARIES
from .checkpointing import CHECKPOINT_PREFIX


# The card templates ship inside the package (package_data in setup.py), so an installed wheel finds them too.
MODEL_CARDS_FOLDER = "model_cards"
# Everything that is not part of the published pipeline.
# Never uploaded: checkpoints, logs, step grids, partial writes, the run's folder lock (`runs.LOCK_NAME`, held while
# the run pushes) and the text-to-image script's text-embedding cache.
HUB_IGNORE_PATTERNS = [f"{CHECKPOINT_PREFIX}*", "logs/*", "*.tmp", "samples/step-*", ".run.lock*", "text_embeddings/*"]


def render_model_card(output_dir: Union[str, os.PathLike], *, template: str, hyperparameters: dict, command: str,
                      repo_id: str, dataset: Optional[str] = None, data_description: Optional[str] = None,
                      metrics: Optional[dict] = None, sample_image: Optional[str] = None,
                      base_model: Optional[str] = None, extra: Optional[dict] = None,
                      tags: Optional[List[str]] = None, pipeline_tag: str = "unconditional-image-generation"):
    """Render the package's `model_cards/<template>` into `output_dir/README.md` with Hub front matter. `dataset`: a Hub
    id (front matter and text); `data_description`: other data, text only; `hyperparameters`: JSON, no secrets;
    `tags` / `pipeline_tag`: the Hub metadata (default: a class-conditional SiT's)."""
    from huggingface_hub import ModelCard, ModelCardData

    template_text = read_model_card_template(template)
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=tags or ["diffusers", "diffusers-selftrans", "sit", "self-transcendence", "class-conditional",
                      "image-generation", "flow-matching"],
        datasets=[dataset] if dataset else None,
        base_model=base_model,
        pipeline_tag=pipeline_tag,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=template_text,
        repo_id=repo_id,
        command=command,
        hyperparameters=json.dumps(dict(sorted(hyperparameters.items())), indent=2, default=str),
        metrics=metrics or {},
        sample_image=sample_image,
        dataset=dataset or data_description,
        base_model=base_model,
        **(extra or {}),
    )
    card.save(str(Path(output_dir) / "README.md"))
    return card


def write_run_card(output_dir: Union[str, os.PathLike], *, run_args: dict, template: str, metrics: dict,
                   sample_image: Optional[str] = None, base_model: Optional[str] = None, **card_kwargs):
    """The model card of a training run from its resolved flags: the exact command, every hyperparameter (secrets
    removed), the data, `metrics` and, if flags changed on resume, the resume history."""
    from .cli import run_arguments

    run_args = run_arguments(run_args)
    if run_args.get("resume_history"):  # [{step, changed: {flag: [old, new]}}]
        metrics = {**metrics, "resume_history": json.dumps(run_args["resume_history"])}
    return render_model_card(
        output_dir, template=template, hyperparameters={k: v for k, v in run_args.items() if k != "launch_command"},
        command=run_args["launch_command"], repo_id=run_args.get("hub_model_id") or Path(output_dir).name,
        dataset=run_args.get("dataset_name"),
        data_description="local image folder" if run_args.get("train_data_dir") else None,
        metrics=metrics, sample_image=sample_image, base_model=base_model, **card_kwargs)


def read_model_card_template(template: str) -> str:
    """The text of the packaged card template `template` (e.g. "stage1.md"); an unknown name is an error that lists
    the available ones."""
    from importlib import resources

    folder = resources.files(__package__) / MODEL_CARDS_FOLDER
    path = folder / template
    if not path.is_file():
        available = sorted(p.name for p in folder.iterdir() if p.name.endswith(".md")) if folder.is_dir() else []
        raise FileNotFoundError(f"No model card template {template!r} in {__package__}/{MODEL_CARDS_FOLDER}/; "
                                f"available: {available}")
    return path.read_text(encoding="utf-8")


def push_to_hub(folder: Union[str, os.PathLike], repo_id: str, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Upload SiT pipeline") -> str:
    """Upload `folder` (without checkpoints, logs and step grids: `HUB_IGNORE_PATTERNS`) to `repo_id`; returns the id."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, exist_ok=True, private=private).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                      ignore_patterns=HUB_IGNORE_PATTERNS)
    return repo_id


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
        if entry[0] in _BUILTIN_LIBRARIES:
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
