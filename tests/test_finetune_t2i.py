"""`benchmarks/finetune_t2i.py` (issue 28, item 5): the target domain and its captions, the smoke run end to end
(base pretrained, plain and Self-Transcendence LoRA runs, stage 1 charged, curves, Welch comparisons at equal steps and
equal compute, the report and its re-derivation), and that the checkpoint EMA adapter the benchmark scores is the
adapter the run exports for `pipe.load_lora_weights`."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import convergence  # noqa: E402
import finetune_t2i as F  # noqa: E402


def test_target_captions_name_brightness_and_digit():
    for style in range(len(F.STYLES)):
        for label in range(10):
            for index in range(len(F.TARGET_TEMPLATES)):
                caption = F.target_caption(style, label, index)
                assert len(caption) <= 29, caption  # the tiny tokenizers' budget: never truncated
                assert F.class_of_target_caption(caption) == style * 10 + label
    with pytest.raises(ValueError, match="brightness"):
        F.class_of_target_caption("a mirrored seven")
    with pytest.raises(ValueError, match="brightness"):
        F.class_of_target_caption("a bright faint mirrored seven")


def test_target_images_are_the_digits_mirrored_and_dimmed(tmp_path):
    import quickstart_assets
    from PIL import Image

    root = F.write_target_digits(tmp_path / "target", 16)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    digits, labels = quickstart_assets.load_digit_images(16)
    assert len(rows) == len(digits) == 1797
    for i in (0, 1, 1000):
        image = np.asarray(Image.open(root / rows[i]["file_name"]).convert("L"))
        style = i % 2
        expected = np.rint(digits[i][:, ::-1].astype(np.float32) * F.STYLES[style][1]).astype(np.uint8)
        np.testing.assert_array_equal(image, expected)
        assert F.class_of_target_caption(rows[i]["text"]) == style * 10 + labels[i]
        assert rows[i]["file_name"].startswith(f"{style * 10 + labels[i]:02d}/")
    assert len([d for d in root.iterdir() if d.is_dir()]) == 20


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune_smoke")
    args = F.parse_args(["--smoke", "--output_dir", str(out)])
    curves = F.main(args)
    return out, args, curves


def test_smoke_run_writes_curves_and_comparisons(smoke):
    out, args, curves = smoke
    saved = json.loads((out / "curves.json").read_text())
    assert set(saved["curves"]) == set(F.METHODS)
    for method in F.METHODS:
        assert sorted(int(s) for s in saved["curves"][method]) == args.seeds == [0]
        for points in curves[method].values():
            steps = [p["step"] for p in points]
            last = 2 * args.steps if method == "plain_lora" else args.steps
            assert steps == [0] + list(range(args.eval_every, last + 1, args.eval_every))
            assert all(np.isfinite(p["fid"]) and 0.0 <= p["accuracy"] <= 1.0 for p in points)
            assert points[0] == curves["plain_lora"][0][0]  # step 0: the same base for every method
    # the adapter teacher's run is charged its stage 1: its seconds start above its own training's
    for seed in args.seeds:
        stage1 = convergence.read_log(out / "runs" / f"seed{seed}" / "stage1_adapter")[args.stage1_steps]
        adapter_log = convergence.read_log(out / "runs" / f"seed{seed}" / "st_lora_adapter")
        first = curves["st_lora_adapter"][seed][1]
        assert first["train_seconds"] == pytest.approx(adapter_log[first["step"]]["train_seconds"]
                                                       + stage1["train_seconds"])
    flops = saved["settings"]["flops_per_step"]  # counted on the script's own steps
    assert flops["plain_lora"] < flops["st_lora_base"] < flops["st_lora_adapter"]  # teacher pass; + its adapter
    assert flops["plain_lora"] < flops["stage1_adapter"]  # + the alignment head
    stop, last = args.guide_stop_step, args.steps
    at_last = {m: next(p for p in curves[m][0] if p["step"] == last)["flops"] for m in F.METHODS}
    assert at_last["plain_lora"] == last * flops["plain_lora"]
    assert at_last["st_lora_base"] == stop * flops["st_lora_base"] + (last - stop) * flops["plain_lora"]
    assert at_last["st_lora_adapter"] == (stop * flops["st_lora_adapter"] + (last - stop) * flops["plain_lora"]
                                          + args.stage1_steps * flops["stage1_adapter"])  # its stage 1 charged
    kinds = {(t["better"], t["at"], t["step"]) for t in saved["comparisons"]}
    assert ("st_lora_adapter", "equal compute", last) in kinds  # plain_lora's curve reaches its cost
    for method in F.GUIDED:
        for step in range(args.eval_every, args.steps + 1, args.eval_every):
            assert (method, "equal steps", step) in kinds
    assert all(t["p_value"] is None or 0.0 <= t["p_value"] <= 1.0 for t in saved["comparisons"])
    assert "settings" in saved and "/tmp" not in json.dumps(saved["settings"])
    results = (out / "results.md").read_text()
    assert "| st_lora_adapter | equal steps |" in results and (out / "finetune.png").stat().st_size > 0
    assert F.main(["--rederive", str(out)]) == results.rstrip("\n")
    assert (out / "results.md").read_text() == results


def test_scored_checkpoint_adapter_is_the_exported_lora(smoke):
    """What the benchmark samples at the last step (the checkpoint's EMA adapter on the base) is what the run exports
    and `StableDiffusion3Pipeline.load_lora_weights` loads."""
    from diffusers import StableDiffusion3Pipeline

    from diffusers_selftrans import checkpointing as C

    out, args, _ = smoke
    run = out / "runs" / "seed0" / "st_lora_base"
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "base")
    mine = F.checkpoint_transformer(pipe.transformer, C.list_checkpoints(run)[-1], args.lora_rank)
    pipe.load_lora_weights(run)
    theirs = pipe.transformer.eval()
    torch.manual_seed(0)
    latents = torch.randn(2, theirs.config.in_channels, 8, 8)
    text = torch.randn(2, 5, theirs.config.joint_attention_dim)
    pooled = torch.randn(2, theirs.config.pooled_projection_dim)
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        a = mine(latents, text, pooled, t).sample
        b = theirs(latents, text, pooled, t).sample
        base = StableDiffusion3Pipeline.from_pretrained(out / "base").transformer.eval()(latents, text, pooled, t)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    assert (a - base.sample).abs().max() > 1e-4  # the adapter is not a no-op (50 x the tolerance)
