"""`benchmarks/convergence_t2i.py --smoke`: captions name the class, vanilla / stage 1 / stage 2 train and every
checkpoint is scored through StableDiffusion3Pipeline; JSON + table + plot."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import convergence_t2i  # noqa: E402
from test_benchmark_convergence import assert_no_machine_paths  # noqa: E402


def test_captions_name_their_class():
    for label in range(10):
        captions = {convergence_t2i.caption_for(label, i) for i in range(len(convergence_t2i.CAPTION_TEMPLATES))}
        assert len(captions) == len(convergence_t2i.CAPTION_TEMPLATES)  # real paraphrases
        assert {convergence_t2i.class_of_caption(c) for c in captions} == {label}
    assert convergence_t2i.caption_for(7, 0) == "a handwritten seven"
    assert convergence_t2i.caption_for(7, 1) == "the digit 7"
    with pytest.raises(ValueError, match="expected exactly one"):
        convergence_t2i.class_of_caption("a photo of a cat")
    with pytest.raises(ValueError, match="expected exactly one"):
        convergence_t2i.class_of_caption("the digit 7 next to a one")


def test_smoke_writes_curves_table_and_plot(tmp_path):
    out = tmp_path / "conv_t2i"
    result = convergence_t2i.main(["--smoke", "--output_dir", str(out)])
    saved = json.loads((out / "curves.json").read_text())
    assert sorted(saved["curves"]) == sorted(convergence_t2i.RUNS)
    for name in convergence_t2i.RUNS:
        points = saved["curves"][name]["0"]
        assert [p["step"] for p in points] == [2, 4]
        assert all(np.isfinite(p["fid"]) and 0 <= p["accuracy"] <= 1 for p in points)
    # the vanilla run trains no alignment head; stage 2 logs its guide until the stop (a quarter of 4 steps)
    vanilla = [json.loads(x) for x in (out / "runs" / "seed0" / "vanilla" / "loss_log.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss_diff"] and not any(k.startswith("loss_") and k != "loss_diff" for k in r)
               for r in vanilla)
    st = [json.loads(x) for x in (out / "runs" / "seed0" / "self_transcendence" / "loss_log.jsonl").read_text()
          .splitlines()]
    assert "loss_guide" in st[0] and "loss_guide" not in st[-1]
    # Self-Transcendence pays for its guiding model in wall-clock
    assert saved["curves"]["self_transcendence"]["0"][0]["train_seconds"] > \
        saved["curves"]["stage1"]["0"][-1]["train_seconds"]
    assert result["summary"]["vanilla"][-1]["seeds"] == 1
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in convergence_t2i.RUNS)
    assert Image.open(out / "convergence.png").size[0] > 500
    # no folder of this machine in what is written: paths relative to the output folder or the repository
    assert_no_machine_paths(out, tmp_path)
    assert (saved["settings"]["output_dir"], saved["settings"]["vae_name_or_path"]) == (
        "OUTPUT_DIR", "examples/assets/digits-vae")
