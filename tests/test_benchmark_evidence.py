"""`benchmarks/evidence.py --smoke`: partial results after every run, resume (only the damaged run is redone), the
loss-matched control, the equal-compute FLOPs and curves; and one command from a colour image folder to the table."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import evidence  # noqa: E402
import flops  # noqa: E402
from test_benchmark_convergence import assert_no_machine_paths  # noqa: E402


def read_events(out):
    return [json.loads(line) for line in (out / "runs_log.jsonl").read_text().splitlines()]


def test_every_row_has_its_paper_number_and_trends_name_rows():
    rows = evidence.all_rows()
    assert set(rows) == set(evidence.PAPER_FID)  # the report looks each row up (a missing one crashed a full run)
    assert {name for t in evidence.TRENDS for name in t[:2]} <= set(rows)
    assert {"lambda_0.1", "lambda_1.0", "w1", "w60", "teacher_25", "layers_10-6"} <= set(rows)
    # the full row run again beside the ablations: its settings exactly, and the same-day rows judged against it
    same = lambda row: {k: v for k, v in row.items() if k not in ("group", "seeds")}  # noqa: E731
    assert same(rows[evidence.RERUN_ROW]) == same(rows["self_transcendence"])
    judged = {worse for better, worse, _ in evidence.TRENDS if better == evidence.RERUN_ROW}
    assert {"self_transcendence", "layers_8-8", "teacher_25", "teacher_50"} <= judged
    assert {f"lambda_{lam}" for lam in ("0.1", "0.3", "0.7", "1.0")} <= judged  # Table 5: 0.5 beats every other λ


def test_schedule_helpers_and_flops():
    # the paper's 8->6 of 12 blocks on the depth-6 tiny SiT is 4->3 (= the library's 2n/3 -> n/2 defaults)
    assert [evidence.scaled_layer(b, 6) for b in (8, 6, 4, 10)] == [4, 3, 2, 5]
    # EMA horizon 1 / (1 - decay) = 2.5 % of the run, as 0.9999 is of 400K steps
    assert 1 / (1 - evidence.ema_decay_for(3000)) == pytest.approx(75)
    with pytest.raises(SystemExit):  # checkpoints every 125 steps: the end (1001) is not one of them
        evidence.parse_args(["--output_dir", "/tmp/unused", "--steps", "1001"])
    config = dict(patch_size=2, num_layers=6, num_attention_heads=4, attention_head_dim=32, sample_size=8,
                  in_channels=4, num_classes=10)
    vanilla = flops.method_flops_per_image("vanilla", config)
    assert vanilla == 6 * flops.sit_forward_macs(config)
    st = flops.method_flops_per_image("self_transcendence", config, projector_dim=512, teacher_config=config,
                                      guiding_layer=4)
    # + the teacher's forward to block 4, twice, + 3 x the projector (16 tokens x (128*512 + 512*512 + 512*128))
    expected = vanilla + 2 * 2 * flops.sit_forward_macs(config, num_blocks=4) + 6 * 16 * (2 * 128 * 512 + 512 ** 2)
    assert st == expected
    with pytest.raises(ValueError, match="teacher_config"):
        flops.method_flops_per_image("self_transcendence", config)


def test_evidence_smoke_partial_results_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "ev"
    argv = ["--smoke", "--output_dir", str(out), "--max_real", "100"]

    # 1. The loss-matched row fails: everything finished before it is already in the results
    real_run = evidence.run_training

    def failing(script, flags, folder, events):
        if "w1_loss_matched" in str(folder):
            raise RuntimeError("simulated kill")
        return real_run(script, flags, folder, events)

    monkeypatch.setattr(evidence, "run_training", failing)
    with pytest.raises(RuntimeError, match="simulated kill"):
        evidence.main(argv)
    partial = json.loads((out / "results.json").read_text())
    assert partial["runs_finished"] == ["self_transcendence/seed0", "vae_align/seed0", "vanilla/seed0"]
    assert "| w1_loss_matched | guidance scale | not yet run |" in (out / "results.md").read_text()
    monkeypatch.setattr(evidence, "run_training", real_run)

    first = [e["run"] for e in read_events(out)]  # relative to the output folder
    assert first == ["runs/vae_align/seed0", "runs/vanilla/seed0", "runs/self_transcendence/seed0",
                     "probes/w1/seed0", "probes/w30/seed0"]

    # 2. Run again: only the missing row trains (the probes are finished runs too)
    result = evidence.main(argv)
    new = [e["run"] for e in read_events(out)[len(first):]]
    assert new == ["runs/w1_loss_matched/seed0"]
    lm = result["loss_match"]
    assert lm["lambda"] == pytest.approx(evidence.DEFAULT_LAMBDA * lm["loss_w30"] / lm["loss_w1"])
    matched_args = json.loads((out / "runs" / "w1_loss_matched" / "seed0" / "args.json").read_text())
    assert matched_args["guide_cfg_scale"] == 1.0
    assert matched_args["guide_loss_weight"] == pytest.approx(lm["lambda"])

    # the curves: vanilla to steps, vanilla charged to steps + stage 1, ST charged its teacher's FLOPs and seconds
    s = result["summary"]
    assert [r["step"] for r in s["vanilla"]] == [2, 4] and [r["step"] for r in s["vanilla_charged"]] == [2, 4, 6]
    st = s["self_transcendence"][-1]
    teacher_flops = 2 * 8 * result["flops_per_image"]["vae_align"]  # stage 1 = 2 steps of batch 8
    assert st["flops_charged_mean"] == pytest.approx(st["flops_mean"] + teacher_flops)
    assert st["flops_amortised_mean"] == pytest.approx(st["flops_mean"] + teacher_flops / 2)  # 2 rows share it
    assert st["seconds_charged_mean"] > st["seconds_mean"]
    assert all(np.isfinite(r["fid_mean"]) for rows in s.values() for r in rows)
    curves = json.loads((out / "loss_curves.json").read_text())
    assert [step for step, _ in curves["self_transcendence"]["0"]] == [1, 2, 3, 4]
    for png in ("equal_compute.png", "loss_curves.png", "ablations.png"):
        assert Image.open(out / png).size[0] > 500
    assert result["convergence"]["verdict"] == "undetermined (1 seed)"
    # equal compute along the run: vanilla's FID at the same cost, interpolated between its own evaluations
    along = result["equal_compute"]["along_curve"]
    assert [q["step"] for q in along] == [2, 4]
    assert along[0]["flops_charged"] == pytest.approx(s["self_transcendence"][0]["flops_charged_mean"])
    v = s["vanilla_charged"]
    for q in along:
        x, y = q["flops_amortised"], q["vanilla_fid_at_flops_amortised"]
        if x > v[-1]["flops_mean"]:
            assert y is None
        else:
            assert y == pytest.approx(np.interp(x, [r["flops_mean"] for r in v], [r["fid_mean"] for r in v]))
    report = (out / "results.md").read_text()
    assert "| ST step | ST FID |" in report
    # the guide loss is logged only while the guide is on (smoke: guide stop at step 1 of 4)
    log = evidence.read_log(out / "runs" / "self_transcendence" / "seed0")
    guide = result["losses"]["self_transcendence"]["loss_guide"][0]
    expected = [r["loss_guide"] for step, r in log.items() if step <= 2 and r.get("loss_guide")]
    assert guide[2] == pytest.approx(np.mean(expected)) and guide[4] is None
    assert "loss_guide" not in result["losses"]["vanilla"] and "| self_transcendence | loss_guide | 1 |" in report
    # one seed has no spread: no "± 0.00" pretending otherwise; the curve table has every evaluated step
    assert "± 0.00" not in report and "| vanilla | headline |" in report and "(1 seed) |" in report
    assert "| row | 2 | 4 | 6 |" in report and "| vanilla_charged (1 seed) |" in report
    # trends judged at mid-run (evaluated step nearest half the run) and at the end
    first_trend = result["trends"][0]
    assert (first_trend["better"], first_trend["worse"]) == ("self_transcendence", "vanilla")
    assert first_trend["mid"]["step"] == 2 and first_trend["end"]["step"] == 4
    assert first_trend["mid"]["fid_difference"] == pytest.approx(s["vanilla"][0]["fid_mean"]
                                                                 - s["self_transcendence"][0]["fid_mean"])
    assert first_trend["end"]["verdict"] == "undetermined (1 seed)"
    assert "| row | group | feature-FID at 2 | feature-FID at 4 |" in report

    # 3. Delete one run's final output: only that run is redone (resumed from its own checkpoint), nothing re-scored
    (out / "runs" / "self_transcendence" / "seed0" / "model_index.json").unlink()
    before = len(read_events(out))
    evidence.main(argv)
    events = read_events(out)[before:]
    assert [e["run"] for e in events] == ["runs/self_transcendence/seed0"]
    assert events[0]["resumed"] is True

    # 4. --report_only trains nothing: an unfinished run is left out of the results, the finished ones are kept
    (out / "runs" / "w1_loss_matched" / "seed0" / "model_index.json").unlink()
    before = len(read_events(out))
    report = evidence.main(argv + ["--report_only"])
    assert len(read_events(out)) == before
    assert "w1_loss_matched/seed0" not in report["runs_finished"] and "vanilla/seed0" in report["runs_finished"]
    assert "| w1_loss_matched | guidance scale | not yet run |" in (out / "results.md").read_text()

    # no folder of this machine in what is written: paths relative to the output folder or the repository
    assert_no_machine_paths(out, tmp_path)
    settings = report["settings"]
    assert (settings["output_dir"], settings["model"]) == ("OUTPUT_DIR", "smoke_model.json")
    assert "Data: data/digits; VAE examples/assets/digits-vae." in (out / "results.md").read_text()


def write_colour_folder(root: Path, per_class=6, size=32):
    """Three classes of coloured squares on noise (red / green / blue), deterministic."""
    rng = np.random.RandomState(0)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.randint(0, 60, (size, size, 3)).astype(np.uint8)
            x, y = rng.randint(0, size // 2, 2)
            image[y:y + size // 2, x:x + size // 2, c] = 230
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def test_evidence_on_a_colour_folder_trains_its_vae(tmp_path):
    data = write_colour_folder(tmp_path / "colours")
    out = tmp_path / "ev"
    result = evidence.main(["--smoke", "--train_data_dir", str(data), "--rows", "vanilla", "--output_dir", str(out)])
    vae = out / "vae"
    assert json.loads((vae / "config.json").read_text())["in_channels"] == 3
    assert result["vae"]["held_out_images"] >= 1 and np.isfinite(result["vae"]["held_out_psnr"])
    assert result["vae"]["data"] == ".../colours"  # a folder outside the repository and the output: its name
    assert "held-out PSNR" in (out / "results.md").read_text()
    assert_no_machine_paths(out, tmp_path)  # the user's folder by its name, the VAE trained here relative to out
    assert result["settings"]["train_data_dir"] == ".../colours"
    assert "Data: .../colours; VAE vae (held-out PSNR" in (out / "results.md").read_text()
    assert [r["step"] for r in result["summary"]["vanilla_charged"]] == [2, 4, 6]
    assert json.loads((out / "runs" / "vanilla" / "seed0" / "args.json").read_text())["vae_name_or_path"] == str(vae)


def test_evidence_merges_runs_finished_elsewhere(tmp_path, capsys):
    """A benchmark split over two machines (or over days whose disks are gone) reports as one: runs finished in
    --merge_results's output are reported from its files, with their teacher's cost, and not trained again."""
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["--smoke", "--max_real", "100"]
    a = evidence.main(base + ["--output_dir", str(first), "--rows", "vae_align", "self_transcendence"])
    argv = base + ["--output_dir", str(second), "--merge_results", str(first), "--rows", "vanilla", "vae_align",
                   "self_transcendence"]
    b = evidence.main(argv)
    # only vanilla trains here: the teacher is not retrained, no run here needs it
    assert [e["run"] for e in read_events(second)] == ["runs/vanilla/seed0"]
    assert b["runs_merged"] == {"from": ".../first", "runs": ["self_transcendence/seed0", "vae_align/seed0"]}
    assert b["runs_finished"] == ["self_transcendence/seed0", "vae_align/seed0", "vanilla/seed0"]
    for view in ("vae_align", "self_transcendence"):
        # FIDs, seconds and FLOPs as measured there, the teacher's seconds too (no teacher here to read them from)
        assert b["curves"][view][0] == a["curves"][view][0]
        assert b["losses"][view] == a["losses"][view]
    assert b["curves"]["self_transcendence"][0][-1]["seconds_charged"] > b["curves"]["self_transcendence"][0][-1][
        "seconds"]
    curves_a, curves_b = (json.loads((d / "loss_curves.json").read_text()) for d in (first, second))
    assert curves_b["self_transcendence"] == curves_a["self_transcendence"] and "vanilla" in curves_b
    assert [t["end"]["step"] for t in b["trends"] if t["worse"] == "vanilla"] == [4, 4]  # both rows beside vanilla
    assert "2 of the runs finished in .../first (not here)" in (second / "results.md").read_text()
    assert_no_machine_paths(second, tmp_path)

    # a row to train here that needs the merged teacher: the teacher is trained here, and reported from here
    b2 = evidence.main(argv + ["w15"])
    new = [e["run"] for e in read_events(second)[1:]]
    assert new == ["runs/vae_align/seed0", "runs/w15/seed0"]
    assert b2["runs_merged"]["runs"] == ["self_transcendence/seed0"]
    # the merged run keeps the teacher seconds measured where it trained, not this machine's retrained teacher's
    # (amortised over the 2 rows that share the teacher here, 1 there)
    keys = ("step", "fid", "accuracy", "seconds", "flops", "flops_charged", "seconds_charged")
    assert [{k: p[k] for k in keys} for p in b2["curves"]["self_transcendence"][0]] == [
        {k: p[k] for k in keys} for p in a["curves"]["self_transcendence"][0]]
    teacher_here = evidence.read_log(second / "runs" / "vae_align" / "seed0")[2]["train_seconds"]
    w15 = b2["curves"]["w15"][0][-1]
    assert w15["seconds_charged"] == pytest.approx(w15["seconds"] + teacher_here)

    # other settings than the merged output's: a clear error before anything runs
    with pytest.raises(SystemExit):
        evidence.parse_args(base + ["--output_dir", str(tmp_path / "third"), "--merge_results", str(first),
                                    "--learning_rate", "0.01"])
    assert "ran with other settings" in capsys.readouterr().err
    # another model (its FLOPs per image differ from the merged output's)
    with pytest.raises(ValueError, match="trained another model"):
        evidence.load_merged(evidence.parse_args(base + ["--output_dir", str(tmp_path / "third"), "--merge_results",
                                                         str(first)]),
                             {"out": tmp_path / "third", "loss_match": None, "flops": {"vanilla": 1.0}},
                             evidence.all_rows())
