"""Class names keep their ids with 11 or more classes: JSON stores ids as strings, and "10" sorts before "2"."""

import json

import torch

from diffusers_selftrans import SiTPipeline, SiTTransformer2DModel
from diffusers_selftrans.data import LATENT_STATS_FILE, LatentSource, latent_shard_name, save_latent_shard

NUM_CLASSES = 12  # > 10: string order ("0", "1", "10", "11", "2", ...) differs from numeric order
NAMES = {i: f"name{i}" for i in range(NUM_CLASSES)}


def _tiny_sit():
    return SiTTransformer2DModel(sample_size=4, patch_size=2, in_channels=4, num_layers=1, num_attention_heads=2,
                                 attention_head_dim=8, num_classes=NUM_CLASSES, id2label=NAMES)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=4)


def test_transformer_and_pipeline_round_trips_keep_ids(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    _tiny_sit().save_pretrained(tmp_path / "t")
    loaded = SiTTransformer2DModel.from_pretrained(tmp_path / "t")
    pipe = SiTPipeline(loaded, _tiny_vae(), FlowMatchEulerDiscreteScheduler(shift=1.0))  # names from the config
    assert pipe.id2label == NAMES
    assert pipe.get_label_ids(["name2", "name10", 11]) == [2, 10, 11]
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert {int(k): v for k, v in index["id2label"].items()} == NAMES
    again = SiTPipeline.from_pretrained(tmp_path / "p")
    assert again.id2label == NAMES and again.get_label_ids("name2") == [2]


def test_latent_shards_keep_ids_whatever_the_json_key_order(tmp_path):
    labels = torch.arange(NUM_CLASSES)
    save_latent_shard(str(tmp_path / latent_shard_name(0, 0)),
                      {"latent_mean": torch.zeros(NUM_CLASSES, 4, 2, 2), "latent_std": torch.ones(NUM_CLASSES, 4, 2, 2),
                       "class_labels": labels}, {})
    stats = {"num_classes": NUM_CLASSES, "count": NUM_CLASSES, "num_shards": 1, "flip": False,
             "id2label": {str(k): v for k, v in NAMES.items()}}
    # sort_keys writes "0", "1", "10", "11", "2", ...: ids must come from the keys, not from positions
    (tmp_path / LATENT_STATS_FILE).write_text(json.dumps(stats, sort_keys=True))
    source = LatentSource(str(tmp_path))
    assert source.id2label == NAMES and source.id2label[2] == "name2"
