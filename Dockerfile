# ai-lb, the vLLM simulator and the bench in one image: `ai-lb serve -c ...`, `ai-lb sim serve ...`,
# `ai-lb bench ...` (the bench's extras are installed too).
# Envoy is not included: run the official envoyproxy/envoy image next to it (docker-compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs: copying the build context wholesale would drag in a local
# .venv, .git and test output. pyproject.toml first so the dependency layer is cached.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
COPY vllmsim ./vllmsim
COPY aibench ./aibench
RUN pip install '.[bench]' && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home ai-lb
USER ai-lb
WORKDIR /

# 50051 ext_proc gRPC, 9464 ai-lb metrics, 8001-8005 simulator (compose's vllm-sim service)
EXPOSE 50051 9464 8001-8005
ENTRYPOINT ["ai-lb"]
CMD ["--help"]
