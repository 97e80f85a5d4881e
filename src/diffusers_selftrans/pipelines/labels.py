# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Class names for `SiTPipeline`: `id2label` as saved in `model_index.json`, and names (ImageNet style, with
comma-separated synonyms) resolved to class ids. Imports only torch and numpy (the pipeline's remote-code copy inlines
it)."""

import difflib
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch


def normalise_id2label(id2label) -> Optional[Dict[int, str]]:
    """JSON turns int keys into strings: accept both, store ints."""
    if id2label is None:
        return None
    if not isinstance(id2label, dict):
        raise ValueError(f"id2label must be a dict {{class id: name}}, got {type(id2label).__name__}.")
    try:
        return {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"id2label keys must be class ids (ints or digit strings): {err}") from err


def build_label_index(id2label: Dict[int, str]) -> Dict[str, List[int]]:
    """Lower-cased full names and comma-separated synonyms -> the ids they name (more than one if ambiguous)."""
    index: Dict[str, List[int]] = {}
    for class_id in sorted(id2label):
        full = id2label[class_id].strip().lower()
        names = {full} | {s.strip().lower() for s in full.split(",")}
        for name in names - {""}:
            index.setdefault(name, []).append(class_id)
    return index


def resolve_label_ids(label: Union[int, str, Sequence[Union[int, str]], torch.Tensor], num_classes: int,
                      id2label: Optional[Dict[int, str]], index: Dict[str, List[int]]) -> List[int]:
    """Class ids of `label` (ids, names or a mix; a bare string is one label), checked against `num_classes`;
    `index` is `build_label_index(id2label)`. Unknown names (with close matches), ambiguous synonyms and ids out of
    range are `ValueError`s."""
    if isinstance(label, (torch.Tensor, np.ndarray)):
        if label.ndim > 1:
            raise ValueError(f"class_labels must be 0-D or 1-D, got shape {tuple(label.shape)}.")
        label = label.tolist()
    if isinstance(label, (str, int, np.integer)):
        label = [label]
    if not isinstance(label, (list, tuple)) or len(label) == 0:
        raise ValueError(f"class_labels must be an int, a str or a non-empty list of them, got {label!r}.")
    ids = []
    for item in label:
        if isinstance(item, (bool, np.bool_)):
            raise ValueError(f"Class labels must be ints or names, got {item!r}.")
        if isinstance(item, (int, np.integer)):
            if not 0 <= int(item) < num_classes:
                raise ValueError(f"Class id {int(item)} is outside [0, {num_classes}) for this transformer.")
            ids.append(int(item))
        elif isinstance(item, str):
            ids.append(_name_to_id(item, id2label, index))
        else:
            raise ValueError(f"Class labels must be ints or names, got {type(item).__name__} {item!r}.")
    return ids


def _name_to_id(name: str, id2label: Optional[Dict[int, str]], index: Dict[str, List[int]]) -> int:
    if not id2label:
        raise ValueError(f"Got the class name {name!r} but this pipeline has no `id2label`; pass integer ids.")
    key = name.strip().lower()
    ids = index.get(key)
    if ids is None:
        close = difflib.get_close_matches(key, list(index), n=5)
        hint = f" Close matches: {close}." if close else ""
        raise ValueError(f"Unknown class name {name!r}.{hint}")
    if len(ids) > 1:
        options = ", ".join(f"{i} ({id2label[i]!r})" for i in ids)
        raise ValueError(f"Class name {name!r} is ambiguous: it names {options}. Pass the id instead.")
    return ids[0]
