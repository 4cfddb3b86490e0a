"""`datapin-sidecar`: one program, three modes, configured only by `DATAPIN_*` variables.

    datapin-sidecar once      init container: publish the pod's revisions, exit
    datapin-sidecar run       native sidecar: publish, serve probes and metrics, follow pins
    datapin-sidecar agent     node DaemonSet: prefetch, GC, workspace reaping, node metrics
    datapin-sidecar settings  print every setting with its default

`main()` is the app factory: it reads the environment once (into `Settings`, plus the mapping
credential lookups use), configures logging, creates the metrics registry and hands all of it
down. Exit codes are those of `errors.py` (0 published, 2 bad settings or annotations, 3-8 the
materialiser's, 143 stopped before done); on failure the reason also goes to the
termination-message file, which `kubectl describe pod` shows.

Each mode imports what it runs, when it runs it: `run` and `once` never load the node agent
(which brings the CSI plugin, gRPC and the Kubernetes client, ~0.5 s of imports on a shared
node). A pod's time to ready is mostly start-up on a warm
node, so this is the sidecar's start-up budget (bench/bench_startup.py measures it, and
tests/test_startup.py guards what `run` imports).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from datapin_sidecar.errors import BadSettingsError, DatapinError
from datapin_sidecar.logs import configure_logging, redacting_excepthook
from datapin_sidecar.redaction import redact

if TYPE_CHECKING:  # imported by the mode that runs them: see the module doc
    from datapin_sidecar.node.agent import Agent
    from datapin_sidecar.node.metrics import Metrics
    from datapin_sidecar.node.settings import Settings
    from datapin_sidecar.node.sidecar import Sidecar

log = logging.getLogger("datapin_sidecar")

#: kubelet keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT: Final = 4096
_DEFAULT_TERMINATION_PATH: Final = "/dev/termination-log"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datapin-sidecar",
        description="datapin's sidecar, init container and node agent. Configured by DATAPIN_* "
        "environment variables (`datapin-sidecar settings` lists them).",
    )
    parser.add_argument("mode", choices=["once", "run", "agent", "settings"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `datapin-sidecar` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    sys.excepthook = redacting_excepthook
    from datapin_sidecar.node.settings import (  # noqa: PLC0415 - see the module doc
        check_directories,
        describe,
        load_settings,
    )

    if args.mode == "settings":
        sys.stdout.write(describe())
        return 0
    environ: Mapping[str, str] = os.environ
    try:
        settings = load_settings()
        check_directories(settings)
    except BadSettingsError as exc:
        print(f"datapin-sidecar: {redact(str(exc))}", file=sys.stderr)
        # Settings could not be read, so neither could their termination path: the default
        # (or the variable itself, read here in main like everything else).
        path = environ.get("DATAPIN_TERMINATION_MESSAGE_PATH", _DEFAULT_TERMINATION_PATH)
        write_termination_message(Path(path), str(exc))
        return exc.exit_code
    pod = "/".join(p for p in (settings.pod_namespace, settings.pod_name) if p)
    static = {"mode": args.mode} | ({"pod": pod} if pod else {})
    if settings.node_name:
        static["node"] = settings.node_name
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from datapin_sidecar.node.metrics import Metrics  # noqa: PLC0415

    configure_logging(fmt=settings.log_format, level=settings.log_level, static=static)
    registry = CollectorRegistry()
    metrics = Metrics(registry, role="agent" if args.mode == "agent" else "sidecar")
    from datapin_sidecar import eventloop  # noqa: PLC0415

    try:
        code, message = eventloop.run(
            run_program(args.mode, settings, environ=environ, metrics=metrics),
            fast=args.mode != "agent",  # grpc.aio: see eventloop's doc
        )
    except DatapinError as exc:
        code, message = exc.exit_code, str(exc)
        log.error("%s", exc)
    except KeyboardInterrupt:
        return 130
    if code != 0 and message:
        write_termination_message(settings.termination_message_path, message)
    return code


async def run_program(
    mode: str, settings: Settings, *, environ: Mapping[str, str], metrics: Metrics
) -> tuple[int, str]:
    """Run `mode` until done (once) or stopped (run, agent); (exit code, message)."""
    import asyncio  # noqa: PLC0415 - see the module doc

    from datapin_sidecar.node.server import Health, make_app, serve  # noqa: PLC0415
    from datapin_sidecar.node.sidecar import Sidecar  # noqa: PLC0415

    if mode == "once":
        return await _once(settings, environ, metrics)
    health = Health()
    app = make_app(metrics.registry, health)
    worker: Sidecar | Agent
    if mode == "run":
        worker = Sidecar(settings, environ=environ, metrics=metrics)
    else:
        from datapin_sidecar.node.agent import Agent  # noqa: PLC0415 - the agent mode only

        worker = Agent(settings, environ=environ, metrics=metrics)
    health.status = worker.status
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    runner, port = await serve(app, host=settings.http_host, port=settings.http_port)
    log.info("serving /readyz /healthz /metrics on %s:%d", settings.http_host, port)
    try:
        async with worker.opened():
            if isinstance(worker, Sidecar):
                sidecar = worker

                def changed() -> None:
                    health.ready = sidecar.ready()
                    metrics.ready.set(1 if health.ready else 0)
                    health.waiting_for = sidecar.waiting_for()

                await sidecar.run(on_change=changed)
            else:
                agent = worker
                health.waiting_for = "the first GC cycle"

                def cycled() -> None:
                    health.ready = agent.ready()
                    metrics.ready.set(1 if health.ready else 0)

                agent.on_cycle = cycled
                await agent.run()
    except (DatapinError, BaseExceptionGroup) as exc:
        first = _first_error(exc)
        if first is None:
            raise
        log.error("%s", first)
        return first.exit_code, str(first)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            await runner.cleanup()
    log.info("stopped cleanly")
    return 0, ""


async def _once(
    settings: Settings, environ: Mapping[str, str], metrics: Metrics
) -> tuple[int, str]:
    import asyncio  # noqa: PLC0415 - see the module doc

    from datapin_sidecar.node.sidecar import Sidecar, outcome_of  # noqa: PLC0415

    sidecar = Sidecar(settings, environ=environ, metrics=metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sidecar.stop)
    started = time.monotonic()
    async with sidecar.opened():
        failures = await sidecar.once()
    outcome = outcome_of(failures)
    if outcome.code == 0:
        log.info("all datasets published in %.3f s", time.monotonic() - started)
    return outcome.code, outcome.message


def _first_error(exc: BaseException) -> DatapinError | None:
    """The first DatapinError in `exc` (TaskGroups wrap what their tasks raise in groups)."""
    if isinstance(exc, DatapinError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_error(inner)
            if found is not None:
                return found
    return None


def write_termination_message(path: Path, message: str) -> None:
    """Best effort: outside Kubernetes there is usually no such file to write.

    Key values are masked (`redact`), and the file is opened without blocking: a FIFO with
    no reader in its place fails at once (ENXIO) instead of hanging the exit.
    """
    data = redact(message).encode()[:TERMINATION_MESSAGE_LIMIT]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    with contextlib.suppress(OSError):
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


if __name__ == "__main__":
    raise SystemExit(main())
