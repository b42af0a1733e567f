# One image for every Lanes binary. Build: docker build -t lanes .
# Stage 1 builds the workspace; stage 2 takes ONNX Runtime's shared library from its
# PyPI wheel; the runtime stage carries both, the models, and nothing else.

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential pkg-config perl libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --exclude lanes-tests --bins

FROM python:3.11-slim-bookworm AS ort
RUN pip install --no-cache-dir onnxruntime==1.32.0 \
    && cp "$(python -c 'import glob, onnxruntime, os; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')" /libonnxruntime.so

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libssl3 zlib1g libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /opt/lanes lanes
COPY --from=ort /libonnxruntime.so /usr/local/lib/libonnxruntime.so
COPY --from=build /src/target/release/lanes /src/target/release/lanes-ingest \
     /src/target/release/lanes-micro-batcher /src/target/release/lanes-scorer \
     /src/target/release/lanes-cache-writer /src/target/release/lanes-fallback-responder \
     /src/target/release/lanes-schema-registry /usr/local/bin/
COPY models /opt/lanes/models
ENV ORT_DYLIB_PATH=/usr/local/lib/libonnxruntime.so \
    LANES__MODEL__DIR=/opt/lanes/models/fraud \
    LANES__ADMIN__HOST=0.0.0.0 \
    LANES__LOG__FORMAT=json
WORKDIR /opt/lanes
USER lanes
CMD ["lanes", "--help"]
