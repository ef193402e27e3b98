# The portal's own image (web, workers, beat). Model serving images are built by
# ModelPort itself (deployer/images), not from this file.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MODELPORT_DATA_DIR=/data \
    MODELPORT_STATIC_ROOT=/app/staticfiles
WORKDIR /app
COPY pyproject.toml README.md ./
COPY portal ./portal
COPY deployer ./deployer
COPY templates ./templates
COPY static ./static
COPY manage.py ./
RUN python -m pip install -e . \
    && MODELPORT_SECRET_KEY=collectstatic-only MODELPORT_DATA_DIR=/tmp/build \
       python manage.py collectstatic --no-input -v 0 \
    && useradd --system --uid 10001 --home /app modelport \
    && mkdir -p /data/keys && chown modelport /data /data/keys
USER modelport
EXPOSE 8000
CMD ["gunicorn", "portal.asgi:application", "--worker-class", "uvicorn_worker.UvicornWorker", "--bind", "0.0.0.0:8000", "--workers", "2", "--timeout", "900"]
