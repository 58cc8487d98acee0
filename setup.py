from setuptools import Extension, find_packages, setup

# the crop-decoding JPEG reader (pipelines/_cropdecode.c): plain C over libjpeg-turbo's libjpeg API, loaded
# with ctypes; needs libjpeg62-turbo-dev (apt). No -march=native: a build may move to another CPU.
cropdecode = Extension(
    "pipelines._cropdecode",
    sources=["pipelines/_cropdecode.c"],
    libraries=["jpeg"],
    extra_compile_args=["-O3", "-fno-math-errno", "-Wall", "-Wno-unused-function"],
    # without a compiler or libjpeg's headers the install still succeeds: the turbo backend and ffcv's crop decoder
    # then say what is missing, and data.ffcv_decoder=stock, torchvision and dali work
    optional=True,
)

extras = {
    # GPU-side nvJPEG decoding; the CUDA 13 build also runs its CPU operators without a GPU
    "dali": ["nvidia-dali-cuda130>=2.4"],
    # builds from source: needs libturbojpeg0-dev libopencv-dev pkg-config (apt) first
    "ffcv": ["ffcv==1.0.2"],
    "deepspeed": ["deepspeed>=0.19"],
    # `fastvit data photos` reads the sample photographs these packages ship (files only; none is imported)
    "photos": ["scikit-image", "scikit-learn", "matplotlib"],
    "dev": ["pytest>=8"],
}
extras["all"] = sorted({req for name in ("dali", "ffcv", "deepspeed", "photos") for req in extras[name]})

setup(
    name="fastvit_pt",
    version="0.1.0",
    description="Self-supervised pre-training of lightweight Vision Transformers (MAE-lite), built for throughput",
    packages=find_packages(include=["fastvit_pt", "fastvit_pt.*", "pipelines", "pipelines.*"]),
    python_requires=">=3.10",
    install_requires=[
        # the oldest tested: torch 2.11 + torchvision 0.26, the lent GPU machine's (tests pass under them on CPU)
        "torch>=2.11",
        "torchvision>=0.26",
        "timm>=1.0",
        "numpy",
        "click>=8.1",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "pillow",
        # the PNG figures: analyze cka / attention, report --plot, bench --plot (Agg backend, no display)
        "matplotlib",
    ],
    ext_modules=[cropdecode],
    extras_require=extras,
    entry_points={"console_scripts": ["fastvit = fastvit_pt.cli:main"]},
)
