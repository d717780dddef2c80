"""The ``abstain`` command.

::

    abstain serve --policy FILE [--host H] [--port P]   run the proxy
    abstain up [--policy FILE]                          local model + proxy, one command
    abstain local-model [--port P]                      only the local model server
    abstain check-policy FILE [--recalibration-dir D]  validate a policy file
    abstain recalibration show|export --dir D ...       what was learnt from feedback
    abstain calibrate ... / abstain eval ...            see proxy.evaluation.commands
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from proxy import local_model
from proxy.gc_tuning import tune_for_serving
from proxy.policy.loading import PolicyError, load_policy
from proxy.settings import Settings

DEFAULT_POLICY = Path("policies/default.yaml")


def _uvicorn_config(app: Any, settings: Settings) -> Any:
    import uvicorn

    from proxy.server_protocol import HeaderTimeoutProtocol

    httptools = importlib.util.find_spec("httptools") is not None
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # The fast event loop and parser when installed; plain asyncio/h11 otherwise
        # (without the client header timeout, which needs the httptools protocol).
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=HeaderTimeoutProtocol if httptools else "h11",
        limit_concurrency=settings.max_connections,
        # Drain in-flight requests and streams on SIGTERM (Kubernetes sizes its grace
        # period to match: ABSTAIN_GRACEFUL_SHUTDOWN_SECONDS).
        timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
    )
    # Read by HeaderTimeoutProtocol; an attribute so that it travels to worker processes.
    config.client_header_timeout = settings.client_header_timeout_seconds  # type: ignore[attr-defined]
    return config


def _build_app(policy: Path, host: str, port: int) -> Any:
    from proxy.app import create_app

    try:
        return create_app(Settings(policy=policy, host=host, port=port))
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy import multiprocess

    # Flags win over ABSTAIN_* variables, which win over defaults: a container image
    # configures `abstain serve` through its environment, a developer through flags.
    flags: dict[str, Any] = {
        "policy": args.policy,
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
    }
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    # Built first with the factory's import string: uvicorn.Config reads WEB_CONCURRENCY
    # when --workers is not given, and several workers need an import string anyway.
    config = _uvicorn_config(multiprocess.APP_FACTORY, settings)
    if args.workers is not None:
        if args.workers < 1:
            print("--workers must be at least 1", file=sys.stderr)
            return 2
        config.workers = args.workers
    if config.workers > 1:
        return multiprocess.serve_workers(config, settings, os.environ)
    if multiprocess.MULTIPROC_ENV in os.environ:
        # Set by the operator for a single worker: the directory must exist and be empty.
        multiprocess.prepare_directory(os.environ)
    app = _build_app(settings.policy, settings.host, settings.port)
    server = uvicorn.Server(_uvicorn_config(app, settings))
    tune_for_serving(settings.gc_gen0_threshold)
    server.run()
    return 0


def cmd_check_policy(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    tenants = len(policy.spec.tenants)
    print(f"{args.file}: OK ({len(policy.model_names)} models, {tenants} tenants)")
    for line in policy.risk_report():
        print(f"{args.file}: {line}")
    if args.recalibration_dir is not None:
        from proxy.feedback_risk import report
        from proxy.recalibration_store import FileStore

        for line in asyncio.run(report(policy, FileStore(args.recalibration_dir))):
            print(f"{args.file}: {line}")
    for warning in policy.warnings():
        print(f"{args.file}: warning: {warning}")
    return 0


def cmd_recalibration_show(args: argparse.Namespace) -> int:
    """Every tenant and model in a recalibration directory: labels, the map in service."""
    from proxy.recalibration_store import FileStore

    if not args.dir.is_dir():
        print(f"{args.dir}: no such directory", file=sys.stderr)
        return 1
    store = FileStore(args.dir)
    keys = store.known()
    if not keys:
        print(f"{args.dir}: no labels and no recalibration yet")
    for tenant, model in keys:
        labels = asyncio.run(store.labels(tenant, model))
        right = sum(1 for lab in labels if lab.correct)
        mean = sum(lab.base for lab in labels) / len(labels) if labels else float("nan")
        print(
            f"tenant {tenant}, model {model}: {store.count(tenant, model)} labels "
            f"({right} correct; mean shipped P(correct) {mean:.3f})"
        )
        current = store.current(tenant, model)
        if current is None:
            print("  in service: the shipped calibration (no recalibration swapped in)")
        else:
            print(
                f"  in service: recalibration {current.version} (fitted {current.fitted_at} on "
                f"{current.n} labels): P = sigmoid({current.slope:.4f} * logit(p_shipped) "
                f"{current.intercept:+.4f})"
            )
            print(f"  held-out evidence: {json.dumps(dict(current.evidence), sort_keys=True)}")
    if store.skipped:
        print(f"warning: {store.skipped} unreadable line(s) skipped")
    return 0


def cmd_recalibration_export(args: argparse.Namespace) -> int:
    """The shipped calibration with a tenant's recalibration folded in, as a calibration file."""
    from proxy.confidence.calibration import CalibrationError, load_calibration
    from proxy.confidence.recalibration import compose
    from proxy.online_recalibration import served_model
    from proxy.recalibration_store import FileStore

    store = FileStore(args.dir)
    current = store.current(args.tenant, args.model)
    if current is None:
        where = f"tenant {args.tenant}, model {args.model}"
        print(f"no recalibration for {where} in {args.dir}", file=sys.stderr)
        return 1
    try:
        if args.calibration is not None:
            base = load_calibration(args.calibration)
        else:
            # A map of sentences is kept as "<model> (sentences)": the model's calibration.
            rule = load_policy(args.policy).rule(args.tenant, served_model(args.model))
            if rule.calibration is None:
                where = f"tenant {args.tenant}, model {args.model}"
                print(f"{args.policy}: no calibration for {where}; give --calibration",
                      file=sys.stderr)  # fmt: skip
                return 1
            base = rule.calibration
    except (PolicyError, CalibrationError) as exc:
        print(exc, file=sys.stderr)
        return 1
    composed = compose(base, current)
    learnt = {"tenant": args.tenant, "model": args.model, **current.to_dict()}
    fitted_on = {**composed.fitted_on, "recalibration": learnt}
    dataclasses.replace(composed, fitted_on=fitted_on).save(args.out)
    print(
        f"wrote {args.out}: the shipped calibration with recalibration {current.version} "
        f"of tenant {args.tenant}, model {args.model}"
    )
    return 0


def _add_recalibration_commands(sub: Any) -> None:
    recal = sub.add_parser(
        "recalibration", help="inspect and export the recalibrations learnt from feedback"
    )
    actions = recal.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="labels and the map in service, per tenant and model")
    show.add_argument("--dir", type=Path, required=True, help="the recalibration directory")
    show.set_defaults(func=cmd_recalibration_show)
    export = actions.add_parser(
        "export", help="write a tenant's recalibrated map as an ordinary calibration file"
    )
    export.add_argument("--dir", type=Path, required=True, help="the recalibration directory")
    export.add_argument("--tenant", required=True)
    export.add_argument("--model", required=True)
    export.add_argument(
        "--policy",
        type=Path,
        default=DEFAULT_POLICY,
        help="the policy naming the shipped calibration (default %(default)s)",
    )
    export.add_argument("--calibration", type=Path, help="the shipped calibration file itself")
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(func=cmd_recalibration_export)


def _banner(host: str, port: int, model: str) -> str:
    base = f"http://{host}:{port}/v1"
    prompt = "Q: What is the capital of Italy?\\nA: Rome\\nQ: What is the capital of France?\\nA:"
    return f"""
abstain-proxy is ready at {base}

  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="unused")
  r = client.completions.create(model="{model}", max_tokens=16, stop=["\\n"],
      prompt="{prompt}")
  print(r.choices[0].text, r.model_extra["abstention"])

  curl {base}/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "max_tokens": 8, "stop": ["\\n"],
         "prompt": "{prompt}"}}'

Metrics: http://{host}:{port}/metrics    Press Ctrl-C to stop.
"""


def cmd_up(args: argparse.Namespace) -> int:
    import uvicorn

    threads = args.threads or local_model.default_threads()
    print(
        f"starting the local model ({local_model.MODEL_ALIAS}) on port {args.model_port}: "
        f"{threads} threads, {args.slots} parallel slots ..."
    )
    try:
        proc = local_model.start(args.model_port, threads=threads, slots=args.slots)
    except local_model.LocalModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        local_model.wait_ready(f"http://127.0.0.1:{args.model_port}/v1", proc)
        app = _build_app(args.policy, args.host, args.port)
        settings = Settings(
            policy=args.policy, host=args.host, port=args.port, log_level=args.log_level
        )
        server = uvicorn.Server(_uvicorn_config(app, settings))
        tune_for_serving(settings.gc_gen0_threshold)

        async def run() -> None:
            task = asyncio.create_task(server.serve())
            while not server.started and not task.done():
                await asyncio.sleep(0.05)
            if server.started:
                print(_banner(args.host, args.port, local_model.MODEL_ALIAS), flush=True)
            await task

        asyncio.run(run())
    except local_model.LocalModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        local_model.stop(proc)
        print("stopped.")
    return 0


def cmd_local_model(args: argparse.Namespace) -> int:
    try:
        cmd = local_model.server_command(
            args.port, args.host, args.threads, slots=args.slots, context=args.context
        )
    except local_model.LocalModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover - execv does not return


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """The local model server's flags, shared by ``up`` and ``local-model``."""
    parser.add_argument(
        "--threads",
        type=int,
        help=f"CPU threads for the model (default: this machine's cores, "
        f"{local_model.default_threads()} here)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=local_model.DEFAULT_SLOTS,
        help="requests the model decodes in parallel (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abstain", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    # Unset flags fall back to ABSTAIN_POLICY, ABSTAIN_HOST, ... (see proxy.settings).
    serve.add_argument("--policy", type=Path, help=f"default: $ABSTAIN_POLICY or {DEFAULT_POLICY}")
    serve.add_argument("--host", help="default: $ABSTAIN_HOST or 127.0.0.1")
    serve.add_argument("--port", type=int, help="default: $ABSTAIN_PORT or 8080")
    serve.add_argument("--log-level", help="default: $ABSTAIN_LOG_LEVEL or info")
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes (default: $WEB_CONCURRENCY or 1); >1 sums metrics over "
        "workers through $PROMETHEUS_MULTIPROC_DIR, emptied at start",
    )
    serve.set_defaults(func=cmd_serve)

    up = sub.add_parser("up", help="start the local reference model and the proxy in front of it")
    up.add_argument("--policy", type=Path, default=DEFAULT_POLICY)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8080)
    up.add_argument(
        "--model-port",
        type=int,
        default=local_model.DEFAULT_PORT,
        help="must match the policy's base_url",
    )
    up.add_argument("--log-level", default="warning")
    _add_model_args(up)
    up.set_defaults(func=cmd_up)

    local = sub.add_parser("local-model", help="run only the local reference model server")
    local.add_argument("--host", default="127.0.0.1")
    local.add_argument("--port", type=int, default=local_model.DEFAULT_PORT)
    _add_model_args(local)
    local.add_argument(
        "--context",
        type=int,
        default=local_model.DEFAULT_CONTEXT,
        help="tokens of context per slot (default: %(default)s)",
    )
    local.set_defaults(func=cmd_local_model)

    check = sub.add_parser("check-policy", help="validate a policy file")
    check.add_argument("file", type=Path)
    check.add_argument(
        "--recalibration-dir",
        type=Path,
        help="also show the target_error thresholds chosen from the feedback labels stored "
        "there (ABSTAIN_RECALIBRATION_DIR), for tenants that have sent enough",
    )
    check.set_defaults(func=cmd_check_policy)

    _add_recalibration_commands(sub)

    if importlib.util.find_spec("proxy.evaluation.commands"):
        from proxy.evaluation.commands import add_commands

        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
