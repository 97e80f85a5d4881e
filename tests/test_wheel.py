"""The package as users install it: a wheel, installed non-editable into a fresh venv, trains stage 1 and stage 2
from another directory (card templates included), and the folder it writes loads with diffusers alone.

The fresh venv reuses this interpreter's installed dependencies through a `.pth` file that names this interpreter's
site-packages folder. A plain path line in a `.pth` does not process the `.pth` files inside that folder, so the
editable install of the source tree (itself a `.pth` there) is not seen: only the wheel provides `diffusers_selftrans`,
which the test checks.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from test_training import assets, flags  # noqa: F401  (assets: the tiny data/VAE/model fixture)

ROOT = Path(__file__).resolve().parents[1]
# What `setup.py` needs to build the wheel (it reads README.md as the long description).
BUILD_INPUTS = ("setup.py", "README.md", "src")
# Every subprocess gets this long; a healthy run of each takes seconds.
SUBPROCESS_TIMEOUT_S = 300

# Runs a training script by path after checking where `diffusers_selftrans` comes from in this very process.
TRAIN_DRIVER = """
import os, runpy, sys
import diffusers_selftrans
print("PACKAGE_FILE=" + os.path.realpath(diffusers_selftrans.__file__))
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

# Loads a training output with diffusers only: the package is made unimportable first.
LOAD_WITHOUT_PACKAGE = """
import sys
sys.modules["diffusers_selftrans"] = None  # any `import diffusers_selftrans[.x]` now raises ImportError
try:
    import diffusers_selftrans  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("diffusers_selftrans is importable here: the test would prove nothing")

import json
import numpy as np
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
              output_type="np").images
ours = sorted(name for name, module in sys.modules.items() if name.startswith("diffusers_selftrans") and module)
print("RESULT=" + json.dumps({
    "pipeline": type(pipe).__name__, "pipeline_module": type(pipe).__module__,
    "transformer": type(pipe.transformer).__name__, "shape": list(images.shape),
    "finite": bool(np.isfinite(images).all()), "package_modules": ours,
}))
"""


def run(argv, **kwargs):
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                            **kwargs)
    assert result.returncode == 0, f"{argv}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def tagged(stdout: str, tag: str) -> str:
    lines = [line[len(tag):] for line in stdout.splitlines() if line.startswith(tag)]
    assert len(lines) == 1, stdout[-3000:]
    return lines[0]


def build_wheel(dist: Path, workdir: Path) -> Path:
    """`pip wheel` on a copy of the build inputs, so no build/ or *.egg-info is left in the checkout."""
    source = workdir / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", dist, source])
    (wheel,) = dist.glob("diffusers_selftrans-*.whl")
    return wheel


def fresh_venv(path: Path, env: dict) -> Path:
    """A venv whose site-packages links (one plain `.pth` line each) to this interpreter's site-packages.
    `--without-pip`: pip, like every dependency, comes through that link (faster than ensurepip)."""
    run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             env=env).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages / "_reuse_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def test_wheel_trains_both_stages_and_its_output_loads_with_diffusers_alone(assets, tmp_path):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONNOUSERSITE="1",
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"))

    # 1. Wheel, fresh venv, non-editable install from the wheel only
    wheel = build_wheel(tmp_path / "dist", tmp_path)
    assert "diffusers_selftrans/model_cards/stage1.md" in run([sys.executable, "-m", "zipfile", "-l", wheel])
    venv = tmp_path / "fresh"
    python = fresh_venv(venv, env)
    # --ignore-installed: pip also sees the editable install's metadata through the link; never touch it
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], env=env)

    # 2. Stage 1 then stage 2, by path, from a directory that is not the checkout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    driver = tmp_path / "train_driver.py"
    driver.write_text(TRAIN_DRIVER)
    tiny = dict(max_train_steps=2, checkpointing_steps=100, validation_steps=100)
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    out1 = run([python, driver, ROOT / "examples" / "train_align.py", *flags(assets, stage1, **tiny)],
               cwd=elsewhere, env=env)
    out2 = run([python, driver, ROOT / "examples" / "train_self_transcendence.py",
                *flags(assets, stage2, guiding_model_name_or_path=stage1, guide_stop_step=1, **tiny)],
               cwd=elsewhere, env=env)
    for stdout in (out1, out2):
        package_file = Path(tagged(stdout, "PACKAGE_FILE="))
        assert package_file.is_relative_to(venv.resolve()), package_file  # the wheel, not the source tree
        assert not package_file.is_relative_to(ROOT)

    for name in ("model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "README.md", "samples.png", "pipeline_sit.py", "transformer/transformer_sit.py"):
        assert (stage2 / name).is_file(), name
    card = (stage2 / "README.md").read_text()
    assert card.startswith("---") and f"base_model: {stage1}" in card and "stage 2" in card
    assert "library_name: diffusers" in (stage1 / "README.md").read_text()

    # 3. The stage-2 folder with diffusers alone: the package cannot be imported in that process
    loader = tmp_path / "load_without_package.py"
    loader.write_text(LOAD_WITHOUT_PACKAGE)
    result = json.loads(tagged(run([python, loader, stage2], cwd=elsewhere, env=env), "RESULT="))
    assert result["pipeline"] == "SiTPipeline" and result["transformer"] == "SiTTransformer2DModel"
    assert not result["pipeline_module"].startswith("diffusers_selftrans") and result["package_modules"] == []
    assert result["shape"] == [1, 16, 16, 3] and result["finite"]
