"""``python -m app serve``: the command line. Every flag is also an ``EQUISERVE_*`` env var."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Any

from app.config import Settings

log = logging.getLogger("equiserve")


def settings_parser(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (``--max-batch-size`` for ``EQUISERVE_MAX_BATCH_SIZE``)."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env EQUISERVE_{name.upper()}]"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def serve(settings: Settings) -> int:

    from app.server import create_app

    app = create_app(settings)
    engine = app.state.engine
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, engine, settings.drain_timeout_s)
    server.run()
    return 0 if server.started else 1


def uvicorn_config(app: Any, settings: Settings) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.keep_alive_s,
    )


class DrainingServer:
    """uvicorn, with a graceful drain on SIGTERM/SIGINT.

    uvicorn alone stops listening at once. We first turn readiness to 503 and answer new
    requests with 503 while everything already accepted finishes (or ``drain_timeout_s``
    passes); only then does uvicorn shut down, and the lifespan closes the batchers.
    A second signal stops at once.
    """

    def __init__(self, config: Any, engine: Any, drain_timeout_s: float) -> None:
        import uvicorn

        engine_ref, timeout = engine, drain_timeout_s

        class _Server(uvicorn.Server):
            drain_started: float | None = None

            def handle_exit(self, sig: int, frame: Any) -> None:
                if self.drain_started is None and sig in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal %s: draining (readiness 503, new requests 503)", signal.Signals(sig).name)
                    self.drain_started = time.monotonic()
                    engine_ref.begin_drain()
                    return
                super().handle_exit(sig, frame)

            async def on_tick(self, counter: int) -> bool:
                if self.drain_started is not None:
                    waited = time.monotonic() - self.drain_started
                    if engine_ref.idle or waited > timeout:
                        if not engine_ref.idle:
                            log.warning("drain timeout after %.1f s with requests in flight", waited)
                        self.should_exit = True
                return await super().on_tick(counter)

        self._server = _Server(config)

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    def run(self) -> None:
        self._server.run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="equiserve: equivariant model serving")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="start the HTTP server")
    settings_parser(serve_parser)
    from app.training.cli import add_evaluate_parser, add_train_parser  # their flags; the work is imported on run

    add_train_parser(commands)
    add_evaluate_parser(commands)
    from app.training.text_cli import add_text_parsers  # train-text, evaluate-fairness (language models)

    add_text_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        settings = settings_from_args(args)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return serve(settings)
    if args.command == "train":
        from app.training.cli import run_train

        return run_train(args, argv)
    if args.command == "evaluate":
        from app.training.cli import run_evaluate

        return run_evaluate(args)
    if args.command in ("train-text", "evaluate-fairness"):
        from app.training.text_cli import run_text

        return run_text(args, argv)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
