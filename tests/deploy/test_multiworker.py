"""Several uvicorn workers in one process tree: one scrape reports the sum of all workers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from tests.deploy.procs import (
    abstain_command,
    chat,
    decision,
    free_port,
    http_get,
    running,
    sample_total,
    wait_for,
)


def _requests_by_worker(directory: Path) -> dict[str, float]:
    """Requests counted by each worker, read from that worker's own counter file."""
    counts = {}
    for file in directory.glob("counter_*.db"):
        pid = file.stem.removeprefix("counter_")
        metrics: list[Metric] = list(MultiProcessCollector.merge([str(file)]))
        counts[pid] = sum(
            s.value for m in metrics for s in m.samples if s.name == "abstain_requests_total"
        )
    return counts


def _scrape_total(directory: Path) -> float:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return sum(
        s.value for m in registry.collect() for s in m.samples if s.name == "abstain_requests_total"
    )


def test_two_workers_report_the_sum_in_one_scrape(tmp_path: Path, policy_file: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    # Left by an earlier run: must be gone, or its counts would be added to this run's.
    (directory / "counter_999999.db").write_bytes(b"\0" * 64)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [*abstain_command(), "serve", "--policy", str(policy_file)]
    command += ["--port", str(port), "--workers", "2", "--log-level", "info"]
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    log = tmp_path / "proxy.log"

    with running(command, log, f"{base}/healthz", env):
        assert not (directory / "counter_999999.db").exists()
        # /healthz answers once one worker is up; wait for the second one too.
        started = wait_for(
            lambda: log.read_text(errors="replace").count("Application startup complete"),
            lambda n: n == 2,
        )
        assert started == 2, log.read_text(errors="replace")[-3000:]
        gauges = list(directory.glob("gauge_liveall_*.db"))
        assert len(gauges) == 2, f"expected one live gauge per worker, saw {gauges}"

        # Fresh connections, many at once: the kernel hands them to both workers. Batches
        # continue (bounded) until both have served some, which is the point of the test.
        sent: list[str | None] = []
        by_worker: dict[str, float] = {}
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(10):
                models = ["sure", "unsure"] * 8
                sent += [decision(r) for r in pool.map(lambda m: chat(base, m), models)]
                by_worker = _requests_by_worker(directory)
                if len(by_worker) == 2 and all(by_worker.values()):
                    break
        assert sent.count("answer") == sent.count("abstain") == len(sent) // 2
        # A request is counted right after its body is written (the response's background
        # task), so the last answers may reach this thread a moment before their counts.
        by_worker = wait_for(
            lambda: _requests_by_worker(directory), lambda b: sum(b.values()) >= len(sent), 5.0
        )
        assert len(by_worker) == 2 and all(by_worker.values()), by_worker

        status, exposition = http_get(f"{base}/metrics")
        assert status == 200
        scraped = sample_total(exposition, "abstain_requests_total")
        assert scraped == len(sent) == sum(by_worker.values())
        assert (
            sample_total(exposition, "abstain_choices_total", decision="abstain") == len(sent) / 2
        )
        # The live gauge is reported once per worker, labelled by pid.
        assert exposition.count("abstain_policy_last_reload_success{pid=") == 2
        assert _scrape_total(directory) == len(sent)

    # A worker that shut down takes its live gauge with it; its counters stay.
    assert not list(directory.glob("gauge_liveall_*.db"))
    assert len(list(directory.glob("counter_*.db"))) == 2


def test_one_worker_with_a_metrics_directory_set_by_the_operator(
    tmp_path: Path, policy_file: Path
) -> None:
    # prometheus-client switches to files whenever the variable is set, and fails on a
    # directory that does not exist: serve must create (and empty) it for one worker too.
    directory = tmp_path / "not-yet"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [*abstain_command(), "serve", "--policy", str(policy_file), "--port", str(port)]
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    with running(command, tmp_path / "proxy.log", f"{base}/readyz", env):
        assert [decision(chat(base, m)) for m in ("sure", "unsure", "unsure")] == [
            "answer",
            "abstain",
            "abstain",
        ]
        status, exposition = http_get(f"{base}/metrics")
    assert status == 200
    assert sample_total(exposition, "abstain_choices_total", decision="abstain") == 2
    assert list(directory.glob("counter_*.db"))


def test_serve_refuses_zero_workers(capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    assert main(["serve", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
