"""The one question the local stack asks the MLflow registry: which version is the champion?

The stack's model bootstrap (:meth:`quotewatch.local.stack.LocalStack.supervise`) trains a first
model while the registry has no ``champion``; a registry that gives no answer is not "no
champion" (:class:`RegistryUnavailableError`, asked again at the next check).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request

from quotewatch.core.errors import RetriableError

MODEL_NAME = "quotewatch"
CHAMPION = "champion"


class RegistryUnavailableError(RetriableError):
    """The MLflow registry did not give an answer (5xx, timeout, refused connection, not JSON).

    Not the same as "no champion yet": the caller asks again at its next check.
    """


def champion_version(mlflow_url: str, model_name: str = MODEL_NAME) -> str | None:
    """The registry version behind ``models:/<model_name>@champion``, or None while there is none.

    Raises:
        RegistryUnavailableError: the registry gave no answer (any HTTP error but "does not
            exist", a timeout, a refused connection, a reply that is not the expected JSON).
    """
    query = urllib.parse.urlencode({"name": model_name, "alias": CHAMPION})
    url = f"{mlflow_url}/api/2.0/mlflow/registered-models/alias?{query}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http on 127.0.0.1
            payload = json.loads(response.read())
        version = payload.get("model_version", {}).get("version")
    except urllib.error.HTTPError as exc:
        if exc.code in (400, 404):  # RESOURCE_DOES_NOT_EXIST: no such model or alias yet
            return None
        raise RegistryUnavailableError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:  # URLError is an OSError
        raise RegistryUnavailableError(f"{url}: {type(exc).__name__}: {exc}") from exc
    return str(version) if version is not None else None
