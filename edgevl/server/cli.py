"""`edgevl serve`: flags generated from Settings (each also an EDGEVL_* environment variable)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing

from pydantic import ValidationError

from edgevl.server.settings import Settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        env = f"EDGEVL_{name.upper()}"
        default = field.default_factory() if field.default_factory else field.default
        help_ = f"{field.description} [env {env}; default {default!r}]"
        ann = field.annotation
        if ann is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_)
        elif typing.get_origin(ann) is typing.Literal:
            parser.add_argument(_flag(name), dest=name, choices=typing.get_args(ann), default=None, help=help_)
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=help_)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        for key in ("request_id", "path", "status", "ms"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        return json.dumps(out)


def configure_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("edgevl")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            print(f"edgevl serve: {_flag(loc) if loc else ''} {err['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    if settings.ray:
        from edgevl.server.cluster import run_cluster

        return run_cluster(settings)
    from edgevl.ops.memory import MemoryBudgetError
    from edgevl.server.app import create_app, load_default_engine

    try:
        engine = load_default_engine(settings)  # before binding the port: ready when it listens
    except (MemoryBudgetError, FileNotFoundError, ValueError) as e:
        print(f"edgevl serve: {e}", file=sys.stderr)
        return 1
    info = engine.info()
    if info.random_weights:
        logging.getLogger("edgevl").warning(
            "%s has RANDOM WEIGHTS (a demo of the real architecture): answers are meaningless", info.model_name)
    app = create_app(settings, engine)
    print(f"edgevl {info.model_name} ({info.precision}) serving on http://{settings.host}:{settings.port}",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=settings.grace_period_s)
    server = _Server(config)
    server.run()
    return 0


class _Server:
    """uvicorn re-raises SIGTERM after its graceful shutdown, so the process dies 'killed by signal';
    a service manager should see a clean exit 0 after a drain, so we take the signals ourselves."""

    def __init__(self, config) -> None:
        import contextlib
        import signal

        import uvicorn

        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)

    def _stop(self, signum: int, frame: object) -> None:
        logging.getLogger("edgevl").info("signal %d: draining in-flight requests, then exiting", signum)
        self.server.should_exit = True

    def run(self) -> None:
        self.server.run()
