from setuptools import find_packages, setup

setup(
    name="post-training",
    version="0.1.0",
    description="Post-training toolkit for Megatron models: quantize, distill, speculative decoding, export",
    packages=find_packages(include=["post_training", "post_training.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by scripts/setup_env.sh (the CPU build on disk); any 2.x works here.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "nvidia-modelopt==0.47.*",
        "requests",  # imported by modelopt without being declared
        "psutil",  # megatron-core dist checkpointing
        "transformers>=4.56",
        "gguf",
        "accelerate",
        "datasets",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",  # loss curves and acceptance charts (PNG)
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "test": ["pytest", "peft", "deepspeed"],  # deepspeed: real ZeRO checkpoints for consolidate tests (CPU)
    },
    entry_points={
        "console_scripts": [
            "pt-generate=post_training.cli.generate:cli_main",
            "pt-ckpt=post_training.checkpointing.tools.cli:cli_main",
        ]
    },
)
