"""diffusers-selftrans: Self-Transcendence training of diffusion transformers, Hugging Face native."""

from setuptools import find_packages, setup

setup(
    name="diffusers-selftrans",
    version="0.1.0.dev0",
    description="Self-Transcendence (arXiv 2601.07773) training of class-conditional SiT on diffusers + accelerate",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    # model_cards/ holds the card templates read at run time (hub.render_model_card): listed as a (data-only)
    # package so the wheel carries them, not only the source tree
    packages=find_packages("src") + ["diffusers_selftrans.model_cards"],
    include_package_data=True,
    package_data={"diffusers_selftrans.model_cards": ["*.md"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        # below 0.50: set_repa_timesteps relies on FlowMatchHeunDiscreteScheduler.set_timesteps spacing its sigmas
        # down to 1/num_train_timesteps; another grid is a RuntimeError and fails tests/test_schedulers.py
        "diffusers>=0.35,<0.50",
        "transformers>=4.40,<6",
        "accelerate>=1.0,<2",
        "datasets>=3.0,<6",
        "huggingface_hub>=0.34,<3",
        "safetensors>=0.4",
        "torchmetrics>=1.4,<2",
        "numpy",
        "pillow",
        "tqdm",
        "pyyaml",
        "jinja2",
    ],
    extras_require={
        # the quickstart and the convergence benchmark (bundled digits, plots, t-SNE)
        # scipy: the benchmarks' Welch t-tests (benchmarks/stats.py)
        "quickstart": ["scikit-learn>=1.3", "matplotlib>=3.7", "tensorboard>=2.14", "scipy>=1.11"],
        # setuptools: tests/test_wheel.py builds the wheel without build isolation (bdist_wheel is built into
        # setuptools since 70.1, so the separate `wheel` package is not needed)
        # peft: tests/test_lora.py (the LoRA adapters of diffusers_selftrans.lora)
        "test": ["pytest>=7", "scikit-learn>=1.3", "matplotlib>=3.7", "tensorboard>=2.14", "setuptools>=70.1",
                 "scipy>=1.11", "peft>=0.18"],
        # LoRA in both stages (diffusers_selftrans.lora): adapters through peft, saved in diffusers' LoRA format
        "lora": ["peft>=0.18"],
        # Inception FID / IS / precision-recall; pulls torchvision (pick a torch/torchvision pair that match)
        "metrics": ["torch-fidelity>=0.3"],
    },
    entry_points={"console_scripts": ["diffusers-selftrans-convert=diffusers_selftrans.convert:main"]},
)
