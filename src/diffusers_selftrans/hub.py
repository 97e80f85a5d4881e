# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Publishing a trained pipeline: model cards from the packaged `model_cards/` templates and the Hub upload. (The
remote-code export that lets `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` load a folder
without this package is `pipelines/remote_code.py`.)
"""

import json
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .checkpointing import CHECKPOINT_PREFIX, run_arguments

logger = logging.getLogger(__name__)


# The card templates ship inside the package (package_data in setup.py), so an installed wheel finds them too.
MODEL_CARDS_FOLDER = "model_cards"
# Everything that is not part of the published pipeline.
# Never uploaded: checkpoints, logs, step grids, partial writes, the run's folder lock (`runs.LOCK_NAME`, held while
# the run pushes) and the text-to-image script's text-embedding cache.
HUB_IGNORE_PATTERNS = [f"{CHECKPOINT_PREFIX}*", "logs/*", "*.tmp", "samples/step-*", ".run.lock*", "text_embeddings/*"]


# A model trained on ImageNet is bound by its terms of access (non-commercial research and education): named on the card.
IMAGENET_LICENSE = {"license": "other", "license_name": "imagenet-terms-of-access",
                    "license_link": "https://image-net.org/download.php"}
IMAGENET_DATASETS = ("ILSVRC/imagenet-1k", "imagenet-1k")
# Nothing says what the model derives from (local data, an unreachable card): the card says so, claims nothing.
UNKNOWN_LICENSE = {"license": "other", "license_name": "unknown-see-the-training-data"}
LICENSE_FIELDS = ("license", "license_name", "license_link")


def card_license(derived_from: Sequence[Optional[str]] = (), dataset: Optional[str] = None) -> dict:
    """The license fields of a model card, from what the model derives from, never a fixed string: the first model
    in `derived_from` whose card names a license (a fine-tune inherits its base pipeline's; a stage-2 student its
    guiding model's), else the dataset's (ImageNet: its terms of access; a Hub dataset: its card's), else
    `UNKNOWN_LICENSE`."""
    from huggingface_hub import DatasetCard, ModelCard

    for source in derived_from:
        found = _card_license(source, ModelCard) if source else None
        if found:
            return found
    if dataset in IMAGENET_DATASETS:
        return dict(IMAGENET_LICENSE)
    return (_card_license(dataset, DatasetCard) if dataset else None) or dict(UNKNOWN_LICENSE)


def _card_license(name_or_path: str, card_cls) -> Optional[dict]:
    path = Path(os.fspath(name_or_path))
    try:
        card = card_cls.load(path / "README.md" if path.is_dir() else os.fspath(name_or_path))
    except Exception as error:  # a folder without a card, an unknown or unreachable repo: the network boundary
        logger.warning("No license read from %s's card (%s: %s).", name_or_path, type(error).__name__, error)
        return None
    data = card.data.to_dict()
    return {k: data[k] for k in LICENSE_FIELDS if data.get(k)} if data.get("license") else None


def render_model_card(output_dir: Union[str, os.PathLike], *, template: str, hyperparameters: dict, command: str,
                      repo_id: str, dataset: Optional[str] = None, data_description: Optional[str] = None,
                      metrics: Optional[dict] = None, sample_image: Optional[str] = None,
                      base_model: Optional[str] = None, extra: Optional[dict] = None,
                      tags: Optional[List[str]] = None, pipeline_tag: str = "unconditional-image-generation",
                      license_from: Sequence[Optional[str]] = ()):
    """Render the package's `model_cards/<template>` into `output_dir/README.md` with Hub front matter. `dataset`: a Hub
    id (front matter and text); `data_description`: other data, text only; `hyperparameters`: JSON, no secrets;
    `tags` / `pipeline_tag`: the Hub metadata (default: a class-conditional SiT's); the license: `card_license`
    of `license_from` (the models this one derives from) and `dataset`."""
    from huggingface_hub import ModelCard, ModelCardData

    template_text = read_model_card_template(template)
    card_data = ModelCardData(
        library_name="diffusers",
        **card_license(license_from, dataset),
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
    run_args = run_arguments(run_args)
    if run_args.get("resume_history"):  # [{step, changed: {flag: [old, new]}}]
        metrics = {**metrics, "resume_history": json.dumps(run_args["resume_history"])}
    return render_model_card(
        output_dir, template=template, hyperparameters={k: v for k, v in run_args.items() if k != "launch_command"},
        command=run_args["launch_command"], repo_id=run_args.get("hub_model_id") or Path(output_dir).name,
        dataset=run_args.get("dataset_name"),
        data_description="local image folder" if run_args.get("train_data_dir") else None,
        metrics=metrics, sample_image=sample_image, base_model=base_model, license_from=[base_model], **card_kwargs)


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


