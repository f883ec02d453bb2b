# The processor image (target `runtime`, the default) and the sample clients' image (`samples`).
#   docker build -t ai-mesh-extproc:0.1.0 .
#   docker build -t ai-mesh-extproc-samples:0.1.0 --target samples .
# Slim and non-root: a numeric UID so that Kubernetes' runAsNonRoot can verify it; nothing is
# written at run time (bytecode is compiled at build time), so the root filesystem can be read-only.

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
# xds-protos ships an old copy of opentelemetry/proto/* (files opentelemetry-proto owns): reinstall
# the real one last so the OTLP trace exporters import (see the Makefile).
RUN pip install --no-cache-dir --root-user-action=ignore --prefix=/install . \
 && OTEL_PROTO="$(PYTHONPATH=$(echo /install/lib/python3*/site-packages) python -c \
      'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" \
 && pip install --no-cache-dir --root-user-action=ignore --prefix=/install --no-deps --force-reinstall \
      "opentelemetry-proto==${OTEL_PROTO}" \
 && python -m compileall -q /install

FROM python:3.12-slim AS samples
RUN pip install --no-cache-dir --root-user-action=ignore "openai>=1.50" "anthropic>=0.40"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
# The client script comes from a ConfigMap (istio/samples/client.py), mounted at /app.
CMD ["python", "/app/client.py"]

FROM python:3.12-slim AS runtime
COPY --from=build /install /usr/local
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 50051 50052 9902
ENTRYPOINT ["extproc"]
CMD ["serve-kubernetes", "--listen=0.0.0.0:50051"]
