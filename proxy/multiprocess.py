"""Correct metrics when one container runs several uvicorn workers.

Each worker is its own process with its own counters, and a scrape lands on whichever
worker accepts it: without help, ``/metrics`` would report one random worker's share.
prometheus-client's multiprocess mode makes every process write its values to files in
``PROMETHEUS_MULTIPROC_DIR``; a :class:`~prometheus_client.multiprocess.MultiProcessCollector`
sums those files at scrape time, so any worker's ``/metrics`` reports the whole container.

``abstain serve --workers N`` (or ``WEB_CONCURRENCY=N``) calls :func:`serve_workers`,
which empties the directory, passes the settings on as ``ABSTAIN_*`` variables, and lets
uvicorn start the workers; each one builds its app with :func:`app_from_environment`.
One worker per process is still the recommended deployment (one container or pod per
core); this mode exists for hosts where only one container can run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from proxy.policy.loading import PolicyError, load_policy
from proxy.settings import Settings, environment

#: The variable prometheus-client reads (at import) to switch to multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: What uvicorn imports in each worker.
APP_FACTORY = "proxy.multiprocess:app_from_environment"


def prepare_directory(env: MutableMapping[str, str]) -> Path:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory, creating one if unset.

    prometheus-client never expires the files of earlier processes, so values left by a
    previous run would be added to this run's counters: every ``*.db`` file is deleted.
    Only those: a mistyped path must not cost anyone the rest of a directory.
    """
    configured = env.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
    else:
        directory = Path(tempfile.mkdtemp(prefix="abstain-metrics-"))
    for stale in directory.glob("*.db"):
        stale.unlink()
    env[MULTIPROC_ENV] = str(directory)
    return directory


def settings_environment(settings: Settings) -> dict[str, str]:
    """The ``ABSTAIN_*`` variables under which ``Settings()`` in a worker equals ``settings``.

    Workers are spawned, not forked, so the environment is the one channel that carries
    the launcher's flags (``--policy``, ``--port``, ...) into them. Unset optional fields
    stay unset: a variable holding "None" would be read back as the path ``None``.
    """
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        env[f"ABSTAIN_{name.upper()}"] = text
    return env


def scrape_registry(directory: Path) -> CollectorRegistry:
    """A registry whose collection sums the values of every process writing to ``directory``."""
    registry = CollectorRegistry()
    # prometheus-client ships no annotations for this constructor.
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return registry


def app_from_environment() -> FastAPI:
    """uvicorn's app factory in each worker: settings and metrics directory from the environment."""
    from proxy.app import create_app
    from proxy.gc_tuning import tune_for_serving

    env = environment()
    directory = env.get(MULTIPROC_ENV)
    if not directory:
        raise RuntimeError(
            f"{MULTIPROC_ENV} is not set: start several workers with `abstain serve --workers N`"
        )
    settings = Settings()
    app = create_app(settings, env=env)
    app.state.scrape_registry = scrape_registry(Path(directory))
    _forget_live_gauges_on_shutdown(app, directory)
    tune_for_serving(settings.gc_gen0_threshold)
    return app


def _forget_live_gauges_on_shutdown(app: FastAPI, directory: str) -> None:
    """Remove this worker's live gauges from ``directory`` when its lifespan ends.

    A live gauge of a worker that exited would otherwise be reported (with its pid) until
    the directory is emptied; counters stay, because what an exited worker counted still
    happened. Not atexit: uvicorn re-raises SIGTERM after a graceful shutdown, so atexit
    handlers never run in its workers.
    """
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        try:
            async with inner(app) as state:
                yield state
        finally:
            mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]

    app.router.lifespan_context = lifespan


def serve_workers(config: Any, settings: Settings, env: MutableMapping[str, str]) -> int:
    """Run ``config.workers`` uvicorn workers sharing one socket and one metrics directory.

    ``config`` is a ``uvicorn.Config`` whose app is :data:`APP_FACTORY`. ``env`` is the
    environment the workers inherit (``os.environ`` in the CLI).
    """
    from uvicorn.supervisors import Multiprocess

    try:
        # Fail here, once, rather than in every worker uvicorn keeps restarting.
        load_policy(settings.policy)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    prepare_directory(env)
    env.update(settings_environment(settings))
    config.factory = True
    Multiprocess(config, sockets=[config.bind_socket()]).run()
    return 0
