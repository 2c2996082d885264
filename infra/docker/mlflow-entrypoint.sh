#!/bin/sh
# Entry point of the compose MLflow server (docker-compose.yml runs the official image with it).
#
# The basic-auth app (--app-name basic-auth) needs MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF), the same
# across restarts: kept, like the webhook key below, in a private file on the database volume.
#
# MLflow encrypts registry-webhook secrets with MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY; unset, it
# makes up a key per process, and a restarted server can no longer decrypt the secrets it stored
# (inference's webhook). As quotewatch.local.mlflow does for the local server, keep one Fernet key
# next to the database on its volume, created on first start, then exec the server command.
set -eu
key_file="${MLFLOW_WEBHOOK_KEY_FILE:-/mlflow/db/webhook-secret.key}"
if [ ! -s "$key_file" ]; then
    umask 077
    python -c 'import base64, secrets; print(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())' > "$key_file"
fi
MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY="$(cat "$key_file")"
export MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY
flask_key_file="${MLFLOW_FLASK_KEY_FILE:-/mlflow/db/flask-secret.key}"
if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    if [ ! -s "$flask_key_file" ]; then
        umask 077
        python -c 'import secrets; print(secrets.token_urlsafe(32))' > "$flask_key_file"
    fi
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$flask_key_file")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
fi
exec "$@"
