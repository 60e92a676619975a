# The GPU deployment: NVIDIA's Triton Inference Server image with dsa-export in it. Build the engines with it (the
# plan runs only on the TensorRT that built it, so build and serve in the same image), then serve:
#
#   docker build -t dsa-export .
#   docker run --gpus all --rm --shm-size=1g -v $PWD/build/h100:/build dsa-export build --gpu h100 --out /build
#   docker run --gpus all --rm --shm-size=1g -p 8000:8000 -v $PWD/build/h100:/build dsa-export
#
# --shm-size: Triton's Python backend passes every request and response through /dev/shm; docker's default of
# 64 MB is too small for a batch of long prompts (python_backend's README asks for at least 1 GB).
ARG TRITON_VERSION=25.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

WORKDIR /opt/dsa-export
COPY setup.cfg pyproject.toml constraints.txt README.md ./
COPY dsa_export ./dsa_export
# the GPU extra: onnxruntime-gpu and TensorRT (never the CPU onnxruntime beside them)
RUN pip install --no-cache-dir -c constraints.txt ".[gpu]"

# the OpenAI-compatible API (the Triton ports stay inside the container)
EXPOSE 8000
ENTRYPOINT ["dsa-export"]
CMD ["serve", "/build", "--host", "0.0.0.0", "--port", "8000"]
