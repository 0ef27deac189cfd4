# TorchServe with the embedded default archives (effnet, selfie). CPU image; the PyPI torch wheel also
# runs on a GPU when the container is started with one (--gpus all).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/vision-attribution
COPY . .
RUN ./setup.sh && ./archive.sh all
# Inside the container the listeners must bind all interfaces so that published ports reach them;
# token authorization stays on (the keys are in /srv/vision-attribution/key_file.json).
RUN sed 's/127\.0\.0\.1/0.0.0.0/' config.properties > docker-config.properties
EXPOSE 8080 8081 8082
ENV PATH=/srv/vision-attribution/.venv/bin:$PATH
CMD ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "docker-config.properties", \
     "--model-store", "model_store", "--models", "effnet=effnet.mar", "selfie=selfie.mar"]
