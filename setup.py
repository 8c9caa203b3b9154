from setuptools import find_packages, setup

setup(
    name="fairseq-knnlm",
    version="0.1.0",
    description="kNN-LM (Khandelwal et al., ICLR 2020) as a fairseq extension",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_knnlm", "fairseq_knnlm.*"]),
    python_requires=">=3.9",
    install_requires=[
        # fairseq 0.12.2 on PyPI does not import on Python >= 3.11; fairseq-fixed
        # packages fairseq's main branch for current Pythons.
        "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        "fairseq==0.12.2; python_version < '3.11'",
        "torch>=2.0",
        "numpy",
        "hydra-core>=1.0",
        "tqdm",
        "matplotlib",
        "sentencepiece",  # the shared subword vocabulary of examples/books
    ],
    extras_require={
        "cpu": ["faiss-cpu>=1.7"],
        "gpu": ["faiss-gpu-cu12>=1.8"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "fairseq-knnlm-build-index = fairseq_knnlm.cli.build_index:main",
            "fairseq-knnlm-sweep = fairseq_knnlm.cli.sweep:main",
            "fairseq-knnlm-prune = fairseq_knnlm.cli.prune:main",
            "fairseq-knnlm-import = fairseq_knnlm.cli.import_original:main",
            "fairseq-knnlm-prefix = fairseq_knnlm.cli.prefix:main",
        ]
    },
)
