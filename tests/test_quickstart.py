"""The quickstart's steps at a tiny size (seconds): data, latents, stage 1, stage 2, vanilla, grids, table, JSON."""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import quickstart  # noqa: E402


def test_quickstart_end_to_end_at_tiny_size(tmp_path, capsys):
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"patch_size": 2, "num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 16}))
    out = tmp_path / "qs"
    results = quickstart.main(["--output_dir", str(out), "--model", str(model), "--stage1_steps", "2", "--steps", "2",
                               "--batch_size", "8", "--samples_per_class", "1", "--sampling_steps", "2",
                               "--max_real", "300", "--no-progress"])
    printed = capsys.readouterr().out
    # the same scripts a GPU user runs, with their commands shown
    assert "accelerate launch examples/train_align.py" in printed
    assert "accelerate launch examples/train_self_transcendence.py" in printed
    assert "| self_transcendence |" in printed and "| vanilla_sit |" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["settings"]["guide_stop_step"] == 1
    # 3 blocks of width 32 on 4 x 8 x 8 latents, 10 classes: the count of the saved stage-2 transformer
    from diffusers_selftrans import SiTTransformer2DModel

    stage2 = SiTTransformer2DModel.from_pretrained(out / "stage2_selftrans" / "transformer")
    assert saved["settings"]["parameters"] == sum(p.numel() for p in stage2.parameters()) > 0
    assert saved["total_seconds"] >= sum(saved["train_seconds"].values()) > 0
    for name in ("self_transcendence", "vanilla_sit", "stage1_guiding"):
        metrics = saved["models"][name]
        assert metrics["num_fake"] == 10 and metrics["num_real"] == 300
        assert np.isfinite(metrics["fid"]) and 0.0 <= metrics["accuracy"] <= 1.0
        grid = Image.open(out / f"grid_{name}.png")
        assert grid.size[0] == 10 * 2 * 32  # ten labelled class columns at 2x
        assert len(list((out / "samples" / name).glob("*.png"))) == 10
    for folder in ("stage1_guiding", "stage2_selftrans", "vanilla_sit"):
        assert (out / folder / "model_index.json").exists() and (out / folder / "README.md").exists()
    args = json.loads((out / "stage2_selftrans" / "args.json").read_text())
    assert args["guiding_model_name_or_path"] == str(out / "stage1_guiding") and args["ema_decay"] == 0.99


def test_labelled_grid_layout():
    images = np.zeros((20, 8, 8, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 2)
    images[labels == 3] = 255
    grid = np.asarray(quickstart.labelled_grid(images, labels, "title", per_class=2, scale=2))
    assert grid.shape == (18 + 14 + 2 * 16, 10 * 16, 3)
    assert (grid[32:, 3 * 16:4 * 16] == 255).all() and (grid[32:, 2 * 16:3 * 16] == 0).all()
