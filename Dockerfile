# The Know3D image for cluster nodes (clusters/kuberay, clusters/slurm): CPU and GPU workers alike.
# Build: docker build -t ghcr.io/your-org/know3d:latest .
# The Python install is scripts/install.sh, the same script scripts/setup.sh (CI) runs; the system
# libraries are scripts/apt-packages.txt, the same list. torch's CUDA wheels bring their own CUDA
# user-space libraries, so the base only needs the driver interface of the CUDA runtime image.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# compute for torch, graphics for EGL: the NVIDIA container toolkit then mounts the driver's EGL
# library and its GLVND vendor file (10_nvidia.json); Mesa's (50_mesa.json) is the CPU fallback.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    PYOPENGL_PLATFORM=egl \
    PYGLET_HEADLESS=1 \
    DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    KNOW3D_CACHE=/cache/know3d \
    HF_HOME=/cache/huggingface

WORKDIR /opt/know3d
COPY scripts/apt-packages.txt scripts/apt-packages.txt
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends python3 python3-venv python3-dev build-essential \
       $(grep -v '^#' scripts/apt-packages.txt) \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# the project last: a code change does not reinstall the system layer
COPY . .
RUN bash scripts/install.sh /opt/venv/bin/python "torch,vlm,train,eval"

# Ray's own entry points (ray start) and the CLI are on PATH; no service is started by default.
CMD ["know3d", "--help"]
