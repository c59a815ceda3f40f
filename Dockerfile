# syntax=docker/dockerfile:1
# Diffusion Studio on CPU.
#   docker build -t diffusion-studio:cpu .
#   docker run --rm -p 7860:7860 -v ds-data:/data -v "$PWD/models:/models" diffusion-studio:cpu
# The studio listens on 0.0.0.0 in a container, so auth is required and `serve` refuses to start without users:
# create them as docker-compose.yml shows, or give STUDIO_ADMIN_PASSWORD_FILE (a Docker secret) at run time. No
# password or token is in the image. Dockerfile.cuda is the same studio on CUDA; the two must keep the same Python
# (to the patch level) and Ray, which a Ray cluster requires of its nodes (tests/test_docker.py checks both).

# The studio's wheel, built apart so the final image holds no source tree or build leftovers.
FROM python:3.11.18-slim-trixie AS wheel
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.18-slim-trixie
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The code belongs to root (the studio can't rewrite itself); the user it runs as owns only /data and /models.
RUN python -m venv /opt/venv \
    && groupadd --system --gid 10001 studio \
    && useradd --system --uid 10001 --gid studio --create-home --home-dir /home/studio --shell /usr/sbin/nologin studio \
    && install -d -o studio -g studio /data /models

# torch first, pinned, from PyTorch's CPU index: PyPI's torch wheels are CUDA builds of several GB, which the
# studio's own install would otherwise pull in.
RUN pip install --no-cache-dir torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu

# The studio, and Ray for the cluster executor and the compose file's `ray start` head. spandrel (upscaler files)
# with --no-deps, as ./studio does: it names torchvision, whose PyPI wheels would replace the CPU torch.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/diffusion_studio-*.whl ray==2.58.0 \
    && pip install --no-cache-dir --no-deps spandrel==0.4.2 \
    && python -c "import diffusion_studio.cli, spandrel, torch; assert torch.version.cuda is None, torch.__version__"

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/studio-entrypoint

# Settings as environment (StudioConfig reads DS_*): the data dir and the models folder are the two volumes. No
# hub downloads at run time (models come from /models or the hub cache), no Gradio analytics. The device is found
# (cpu: this torch has no CUDA); the executor is the default, local one: the compose file switches the studio
# service to Ray.
ENV DS_DATA_DIR=/data \
    DS_MODELS_DIR=/models \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False
VOLUME ["/data", "/models"]
USER 10001:10001
WORKDIR /home/studio
EXPOSE 7860
# /health answers 200 {"status": "ok"}, or 503 while the data dir can't be written or a worker is down; urlopen
# raises on anything but 2xx, and on a refused connection, so the exit status is 0 only when the studio is well.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/health', timeout=8)"]
ENTRYPOINT ["/usr/local/bin/studio-entrypoint"]
CMD ["diffusion-studio", "serve", "--host", "0.0.0.0", "--port", "7860"]
