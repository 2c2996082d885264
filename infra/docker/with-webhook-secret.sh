#!/bin/sh
# Entry point of the inference container: run "$@" with an MLFLOW_WEBHOOK_SECRET.
#
# Inference refuses a webhook receiver without an HMAC secret. It registers (or updates, by name)
# its webhook on the MLflow server with that secret at every start, so when none is given a fresh
# random one per container start is enough; set MLFLOW_WEBHOOK_SECRET to pin it instead.
set -eu
if [ -z "${MLFLOW_WEBHOOK_SECRET:-}" ]; then
    MLFLOW_WEBHOOK_SECRET="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    export MLFLOW_WEBHOOK_SECRET
fi
exec "$@"
