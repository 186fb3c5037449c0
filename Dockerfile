# One image for every service of docker-compose.yml: the Ray head, the GPU workers, the controller and the dashboard
# must run the same Python, Ray and evomerge.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}
WORKDIR /app
COPY --chown=ray:users . /app
RUN pip install --no-cache-dir -e "/app[ray,postgres,dashboard]"
ENV HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
