"""Install the `capfilt` distribution and its console script. The four layer folders
(transforms, model, pipeline, jobs) install under the one import name `capfilt`
(`capfilt.model`, ...); nothing installs a bare `model` or `pipeline`.
`requirements.txt` pins the exact runtime set (what a Beam SDK worker installs) and
`requirements-dev.txt` adds the test tools; the ranges here are what the code needs."""
from setuptools import find_packages, setup

LAYERS = ("transforms", "model", "pipeline", "jobs")

setup(
    name="capfilt",
    version="0.1.0",
    description="Curate web image-text data with BLIP's CapFilt bootstrapping (Beam + transformers + open_clip)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # `capfilt` itself is an implicit namespace package: its only contents are the four layers.
    packages=[f"capfilt.{p}" for p in find_packages(include=[f"{layer}*" for layer in LAYERS])],
    package_dir={f"capfilt.{layer}": layer for layer in LAYERS},
    package_data={"capfilt.model": ["configs/*.json"], "capfilt.jobs": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "transformers>=5.0,<6",
        "tokenizers",
        "safetensors",
        "huggingface_hub",
        "apache-beam>=2.60",
        "pyarrow>=17",
        "filelock>=4",
        "numpy>=1.26",
        "pillow",
        "img2dataset>=1.45",
        "pandas",
        "webdataset",
        "open_clip_torch>=3.0",
        "timm>=1.0",
        "pycocoevalcap",
        "matplotlib",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "cpu": ["faiss-cpu>=1.8"],
        "gpu": ["faiss-gpu>=1.8"],
        # s3:// and gs:// paths through Beam's FileSystems
        "aws": ["apache-beam[aws]>=2.60"],
        "gcp": ["apache-beam[gcp]>=2.60"],
        "spark": ["pyspark>=4.0"],  # capfilt ingest --distributor pyspark (Spark 4 runs on Java 17+)
        "dev": ["pytest>=8", "pytest-timeout", "moto[server]>=5", "faiss-cpu>=1.8", "pyspark>=4.0"],
    },
    entry_points={"console_scripts": ["capfilt=capfilt.jobs.cli:main_entry"]},
)
