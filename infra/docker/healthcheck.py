"""Container healthcheck of a QuoteWatch service: exit 0 when ``/health`` answers 200.

Docker runs this (``HEALTHCHECK`` in infra/Dockerfile) every interval inside the container. It reads
the same METRICS_PORT the service binds (``quotewatch.core.health``), or for the dashboard (no
METRICS_PORT) its own ``/health`` on DASH_PORT; a service whose processing stalled answers 503 and
the container turns unhealthy. A container with neither (a one-shot job) is healthy while its
process runs.
Standard library only: it must not import the service's dependencies.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = int(os.environ.get("METRICS_PORT") or "0") or int(os.environ.get("DASH_PORT") or "0")
    if port == 0:
        return 0
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        sys.stderr.write(f"{url}: HTTP {exc.code}: {exc.read()[:300]!r}\n")
    except OSError as exc:
        sys.stderr.write(f"{url}: {exc}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
