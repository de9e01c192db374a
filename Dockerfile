# moeserve on a CUDA PyTorch base. The base image's torch (2.5) satisfies the package's torch
# range, so pip keeps it; the gRPC stubs are generated from proto/ during `pip install`.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/moeserve
COPY pyproject.toml setup.py README.md ./
COPY moeserve ./moeserve
COPY kernels ./kernels
COPY proto ./proto
COPY models ./models
COPY cluster ./cluster
RUN pip install --no-cache-dir ".[gpu,ray]"

EXPOSE 8000 50051
# Listen on every interface inside the container; pass the model path and flags after the image name:
#   docker run --gpus all -p 8000:8000 -v /models:/models moeserve /models/Mixtral-8x7B --device cuda
ENTRYPOINT ["moeserve", "serve", "--host", "0.0.0.0", "--grpc-port", "50051"]
