"""Which models inference serves, and how they are swapped while the stream keeps flowing.

:class:`ModelManager` owns a :class:`Serving` record (champion, challenger). The processing
thread reads it once per feature record; a background thread replaces it, so the swap is one
reference assignment between two records: a record is scored entirely by the old or entirely
by the new model, and no record waits for a load.

The background thread checks the aliases every MODEL_POLL_SECONDS, and at once when the MLflow
webhook receiver calls :meth:`ModelManager.nudge`. When an alias points at a version other than
the one serving, it loads the **pinned** version (``models:/<name>/<N>``), runs the warm-up
checks (:func:`quotewatch.domain.ml.models.warm_up_problems`: feature spec, width, finite outputs
in [0, 1] on a canned batch of recent feature vectors), and only then swaps. Any failure leaves
the current model serving -- among them a version its tags do not vouch for (digest, signature) and
a format that could run code (:func:`quotewatch.domain.ml.registry.load_model_version`) -- is
logged with the reason and counted
(``quotewatch_model_reloads_total{outcome="failure"}``); the failed version is retried with
exponential backoff (1 poll interval, doubling, at most 5 min), not at every poll.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from quotewatch.core.clock import Clock
from quotewatch.core.errors import QuoteWatchError
from quotewatch.core.metrics import MODEL_RELOADS, MODEL_VERSION
from quotewatch.domain.market import features
from quotewatch.domain.ml.models import (  # the roles live in domain: the backtest names them too
    CHALLENGER_ROLE,
    CHAMPION_ROLE,
    canned_batch,
    warm_up_problems,
)
from quotewatch.domain.ml.registry import (
    LoadedModel,
    ModelUri,
    RegistryUnavailableError,
    load_model_version,
    make_client,
    resolve_version,
)

logger = logging.getLogger(__name__)

MAX_RETRY_SECONDS = 300.0

Loader = Callable[[str, str, str], LoadedModel]
"""(tracking_uri, model name, version) -> a loaded model."""
Resolver = Callable[[ModelUri], "str | None"]
"""A model URI -> the version it points at now, or None."""


@dataclass(frozen=True, slots=True)
class Serving:
    """The models scoring the stream right now (immutable; replaced whole on a swap)."""

    champion: LoadedModel | None = None
    challenger: LoadedModel | None = None


class FeatureSample:
    """The feature spec and recent vectors seen on the stream, for warm-up checks.

    Written by the processing thread (:meth:`observe`), read by the loader thread.
    """

    def __init__(self, size: int = 32) -> None:
        self._lock = threading.Lock()
        self._vectors: deque[tuple[float, ...]] = deque(maxlen=size)
        self._spec_id: str | None = None
        self._width: int | None = None

    def observe(self, feature_spec_id: str, values: Sequence[float]) -> None:
        with self._lock:
            if feature_spec_id != self._spec_id:
                self._vectors.clear()
                self._spec_id = feature_spec_id
                self._width = len(values)
            self._vectors.append(tuple(values))

    def spec_and_batch(self) -> tuple[str, np.ndarray]:
        """The stream's spec id (this build's spec until a vector is seen) and a warm-up batch."""
        with self._lock:
            spec = self._spec_id or features.FEATURE_SPEC_ID
            width = self._width if self._width is not None else len(features.FEATURE_NAMES)
            recent = list(self._vectors)
        return spec, canned_batch(width, recent)


@dataclass
class _Failure:
    attempts: int
    retry_at_ns: int


class ModelManager:
    """Resolves the aliases, loads and checks new versions in the background, swaps atomically.

    Args:
        tracking_uri: the MLflow server; None serves the fallback only.
        challenger_uri: scored in shadow when it resolves; None disables the challenger.
        loader, resolver: injectable for tests (default: the real registry).
        signing_key: MODEL_SIGNING_KEY: with it, only versions signed with it are loaded.
    """

    def __init__(
        self,
        *,
        service: str,
        tracking_uri: str | None,
        champion_uri: ModelUri,
        challenger_uri: ModelUri | None,
        poll_seconds: float,
        clock: Clock,
        sample: FeatureSample,
        loader: Loader | None = None,
        resolver: Resolver | None = None,
        signing_key: str | None = None,
    ) -> None:
        self._service = service
        self._tracking_uri = tracking_uri
        self._uris = {CHAMPION_ROLE: champion_uri, CHALLENGER_ROLE: challenger_uri}
        self._poll_ns = int(poll_seconds * 1e9)
        self._clock = clock
        self._sample = sample
        self._loader: Loader = loader or partial(load_model_version, signing_key=signing_key)
        self._real_loader = loader is None
        if resolver is None and tracking_uri is not None:
            client = make_client(tracking_uri)
            resolver = lambda uri: resolve_version(client, uri)  # noqa: E731 - a one-line binding
        self._resolver = resolver
        self._serving = Serving()
        self._failures: dict[tuple[str, str], _Failure] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable_logged = False
        self.reloads_succeeded = 0
        self.reloads_failed = 0
        self.last_detection: tuple[str, str, int] | None = None
        """(role, version, clock monotonic ns) of the last alias change seen, before its load."""
        self._set_version_gauges()

    @property
    def serving(self) -> Serving:
        """The current models (one attribute read: safe from any thread)."""
        return self._serving

    # -- background thread ----------------------------------------------------------------------

    def start(self) -> ModelManager:
        """Start the background checker (it checks at once, then every poll interval or nudge)."""
        if self._resolver is None:
            logger.warning("MLFLOW_TRACKING_URI is not set: serving the fallback model only")
            return self
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
        self._thread.start()
        return self

    def nudge(self) -> None:
        """Check the aliases now (called by the webhook receiver on an alias change)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_now()
            except Exception:  # the checker must outlive any single failure
                logger.exception("model check failed unexpectedly; the current models keep serving")
            self._wake.wait(self._poll_ns / 1e9)
            self._wake.clear()

    # -- one check --------------------------------------------------------------------------------

    def check_now(self) -> Serving:
        """Resolve both aliases and load, check and swap in whatever changed; return what serves."""
        if self._resolver is None:
            return self._serving
        for role, uri in self._uris.items():
            if uri is None:
                continue
            try:
                version = self._resolver(uri)
            except RegistryUnavailableError as exc:
                if not self._unreachable_logged:
                    logger.warning("registry unreachable; the current models keep serving: %s", exc)
                    self._unreachable_logged = True
                continue
            except QuoteWatchError as exc:
                logger.warning("cannot resolve %s: %s", uri, exc, extra={"role": role})
                continue
            self._unreachable_logged = False
            self._reconcile(role, uri, version)
        return self._serving

    def _current(self, role: str) -> LoadedModel | None:
        serving = self._serving
        return serving.champion if role == CHAMPION_ROLE else serving.challenger

    def _swap(self, role: str, model: LoadedModel | None) -> None:
        serving = self._serving
        # One reference assignment: the processing thread sees the old or the new record, whole.
        if role == CHAMPION_ROLE:
            self._serving = replace(serving, champion=model)
        else:
            self._serving = replace(serving, challenger=model)
        self._set_version_gauges()

    def _reconcile(self, role: str, uri: ModelUri, version: str | None) -> None:
        current = self._current(role)
        if version is None:
            if role == CHALLENGER_ROLE and current is not None:
                logger.info("challenger alias removed: no more shadow scoring", extra={"version": current.version})
                self._swap(role, None)
            elif role == CHAMPION_ROLE and current is not None:
                logger.warning("%s no longer resolves; v%s keeps serving", uri, current.version)
            return
        if current is not None and current.version == version:
            return
        failure = self._failures.get((role, version))
        now = self._clock.monotonic_ns()
        if failure is not None and now < failure.retry_at_ns:
            return
        self.last_detection = (role, version, now)
        logger.info("loading %s v%s for %s", uri.name, version, role.lower(), extra={"uri": uri.pinned(version)})
        try:
            model = self._load_and_check(uri, version)
        except Exception as exc:  # noqa: BLE001 - every failure keeps the current model serving
            attempts = failure.attempts + 1 if failure else 1
            delay = min(MAX_RETRY_SECONDS, self._poll_ns / 1e9 * 2 ** (attempts - 1))
            self._failures[(role, version)] = _Failure(attempts, now + int(delay * 1e9))
            MODEL_RELOADS.labels(self._service, "failure").inc()
            self.reloads_failed += 1
            logger.error(
                "model reload failed; %s keeps serving: %s",
                f"v{current.version}" if current else "the fallback" if role == CHAMPION_ROLE else "no challenger",
                exc,
                extra={"uri": uri.pinned(version), "role": role, "attempt": attempts, "retry_in_s": delay},
            )
            return
        self._failures.pop((role, version), None)
        self._swap(role, model)
        MODEL_RELOADS.labels(self._service, "success").inc()
        self.reloads_succeeded += 1
        logger.info(
            "now serving %s v%s as %s",
            model.name,
            model.version,
            role.lower(),
            extra={"previous": current.version if current else None, "feature_spec_id": model.feature_spec_id},
        )

    def _load_and_check(self, uri: ModelUri, version: str) -> LoadedModel:
        assert self._tracking_uri is not None or not self._real_loader
        model = self._loader(self._tracking_uri or "", uri.name, version)
        spec, batch = self._sample.spec_and_batch()
        problems = warm_up_problems(
            model.model,
            model_feature_spec_id=model.feature_spec_id,
            model_feature_names=model.feature_names,
            stream_feature_spec_id=spec,
            batch=batch,
        )
        if problems:
            raise ModelRejectedError(f"{uri.pinned(version)} failed the warm-up checks: {'; '.join(problems)}")
        return model

    def _set_version_gauges(self) -> None:
        serving = self._serving
        for role, model in ((CHAMPION_ROLE, serving.champion), (CHALLENGER_ROLE, serving.challenger)):
            uri = self._uris[role]
            if uri is None:
                continue
            MODEL_VERSION.labels(self._service, role.lower(), uri.name).set(
                int(model.version) if model is not None and model.version.isdigit() else 0
            )


class ModelRejectedError(QuoteWatchError):
    """A loaded model version failed the warm-up checks."""
