"""The `destfnd` command: serve, check-config, run-function here; the commands on the store
in operate.py (stats, deliveries) and interventions.py (retry, move, discard).

Errors reach the user as one clear message and a named exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import structlog

from destfnd import __version__, interventions, logs, operate
from destfnd.config import Config, ConfigError, DestinationConfig, load_config, parse_duration
from destfnd.errors import DestfndError, UsageError
from destfnd.store import Status, StoreError, StoreUnavailable
from destfnd.texts import is_text, sendable

EXIT_OK = 0
EXIT_ERROR = 1  # the daemon failed while running
EXIT_USAGE = 2  # argparse's own
EXIT_CONFIG = 3  # the config is invalid
EXIT_STORE = 4  # the database cannot be opened or read
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, as a program the signal had stopped
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a program the signal had stopped


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:  # what is still buffered goes out here, where a closed pipe is caught
            if sys.stdout is not None:  # None: started with stdout closed
                sys.stdout.flush()
    except BrokenPipeError:
        # `destfnd deliveries | head`: the reader has what it wanted. Quiet, as other tools;
        # stdout goes to /dev/null so the interpreter's final flush fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.filename is not None:  # a file the command reads, not its output
            print(f"destfnd: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_ERROR
        # Output to a full disk, say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"destfnd: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR


def _run(argv: list[str] | None) -> int:
    # --help, --version and usage errors: SystemExit. An unknown option is told with the
    # command's usage (argparse's parse_args tells it with the top level's).
    args, unknown = _parser().parse_known_args(argv)
    if unknown:
        args.usage.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name, flag in _TEXT_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str) and not is_text(value):
            # Bytes that are not UTF-8 (a terminal in another encoding): a traceback of
            # SQLite's, which cannot take them, was what it got.
            args.usage.error(f"{flag} '{sendable(value)}': not UTF-8 text")
    # Log lines (a worker's stray output, say) go to stderr, never into a command's output;
    # serve sets its own from the config.
    logs.setup("info", "auto")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"destfnd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        _print_problems("the config is invalid", exc.problems)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"destfnd: {exc}", file=sys.stderr)
        return EXIT_ERROR if isinstance(exc, StoreUnavailable) else EXIT_STORE
    except DestfndError as exc:
        from destfnd.deliverers import DestinationStartError
        from destfnd.run_function import RunError

        if isinstance(exc, DestinationStartError):  # laid out as check-config's problems
            _print_problems("a destination cannot start", exc.problems)
            # A load that ran out of time may succeed the next time (a cold cache after a
            # reboot): exit 1, which the unit restarts, rather than 3, which it does not.
            return EXIT_ERROR if exc.transient else EXIT_CONFIG
        print(f"destfnd: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, RunError) else EXIT_ERROR
    except KeyboardInterrupt:  # Ctrl-C (serve has a handler of its own: it stops gracefully)
        return EXIT_INTERRUPTED


# Arguments that are names or ids, compared with what the store holds (UTF-8); paths are not.
_TEXT_ARGUMENTS = (("destination", "--destination"), ("message_id", "--message-id"),
                   ("source", "--from"), ("to", "--to"))  # fmt: skip


def _print_problems(heading: str, problems: list[str]) -> None:
    """One problem per line under the heading."""
    print(f"destfnd: {heading}:", file=sys.stderr)
    for problem in problems:
        _print_item("  ", problem)


def _print_item(prefix: str, text: str) -> None:
    """A problem or warning: the lines of one that has several (a traceback a function printed
    as it failed to load) go deeper, and control characters are escaped, so that text from a
    function cannot pass for problems or warnings of their own."""
    from destfnd.run_function import printable

    first, *more = text.split("\n")
    print(f"{prefix}{printable(first)}", file=sys.stderr)
    for line in more:
        print(f"      {printable(line)}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="destfnd", description="Self-hosted Segment destination functions."
    )
    parser.add_argument("--version", action="version", version=f"destfnd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--config",
            metavar="PATH",
            help="config file (default: $DESTFND_CONFIG, else config/destfnd.toml)",
        )
        # `destfnd check-config path/to/destfnd.toml` works too: what people type first.
        p.add_argument("config_file", nargs="?", metavar="CONFIG", help="same as --config")
        p.set_defaults(func=func, usage=p)
        return p

    command("serve", cmd_serve, "run the daemon in the foreground (logs to stderr)")
    command("check-config", cmd_check_config, "validate the config; list every problem")
    p = command(
        "stats", _on_store(operate.stats), "per destination, how many deliveries are in each status"
    )
    p.add_argument("--json", action="store_true", help="print JSON keyed by destination")
    p = command("deliveries", _on_store(operate.deliveries), "recent deliveries with every attempt")
    p.add_argument("--destination", metavar="N", help="only this destination")
    p.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    p.add_argument("--message-id", metavar="ID", help="only the deliveries of this event")
    p.add_argument(
        "--limit",
        type=_limit,
        default=20,
        metavar="K",
        help="at most K (default 20, at most 10000)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array (with each event)")
    p = command(
        "retry",
        _on_store(interventions.retry),
        "make retrying deliveries due now (after fixing what they wait for)",
    )
    p.add_argument("--destination", metavar="N", help="only this destination's")
    p.add_argument("--message-id", metavar="ID", help="only this event's")
    p.add_argument(
        "--status",
        choices=["retrying", "expired", "discarded", "dropped"],
        default="retrying",
        help="which (default retrying); finished ones get one more attempt each",
    )
    p.add_argument("--json", action="store_true", help='print {"due_now": N}')
    p = command(
        "move", _on_store(interventions.move),
        "give a destination's waiting deliveries to another (after renaming it in the config)",
    )  # fmt: skip
    p.add_argument("--from", dest="source", metavar="OLD", required=True,
                   help="the destination whose deliveries wait (renamed, say)")  # fmt: skip
    p.add_argument("--to", metavar="NEW", required=True, help="a destination of the config")
    p.add_argument("--json", action="store_true", help='print {"moved": N, "left": N}')
    p = command(
        "discard", _on_store(interventions.discard),
        "discard a destination's waiting deliveries (one removed for good from the config)",
    )  # fmt: skip
    p.add_argument("--destination", metavar="N", required=True, help="whose")
    p.add_argument("--message-id", metavar="ID", help="only this event's")
    p.add_argument("--json", action="store_true", help='print {"discarded": N}')
    p = sub.add_parser(
        "run-function",
        help="run a function file once on an event and print what happened",
        description="Run a function once, like the editor's Run button: prints the outcome, "
        "error type, logs, outgoing requests and, with --insert, the resulting event. "
        "A JSON array of events is a batch: on_batch if the file has one, else each event "
        "through its own handler. Exit code 0 when every event succeeded.",
    )
    p.add_argument("file", metavar="FILE", help="the function file (.py)")
    p.add_argument("--event", metavar="FILE", help="the event as JSON (- for stdin)")
    p.add_argument("--settings", metavar="JSON", help="the settings as a JSON object")
    p.add_argument("--insert", action="store_true", help="run it as an insert function")
    p.add_argument("--timeout", type=_seconds, default=5.0, metavar="T",
                   help='how long the run may take: seconds or a duration such as "500ms" '
                        "(default 5)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_run_function, usage=p)
    return parser


def _limit(text: str) -> int:
    """1 to 10,000: every delivery listed is held in memory with all its attempts."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 10000, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A number of seconds ("2.5") or a duration as in the config ("500ms", "1m")."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text)
        except ValueError:
            value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(
            f'must be a number of seconds above 0 or a duration such as "500ms", got {text!r}'
        )
    return value


def _on_store(command: Callable[[Config, argparse.Namespace], None]) -> Callable:
    """A command on the store: the config read without its secrets, which it never needs."""

    def run(args: argparse.Namespace) -> int:
        command(load_config(_config_path(args), resolve_secrets=False), args)
        return EXIT_OK

    return run


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config and args.config_file and args.config != args.config_file:
        raise UsageError(f"two config files given: {args.config} and {args.config_file}")
    return args.config or args.config_file


def cmd_serve(args: argparse.Namespace) -> int:
    from destfnd.daemon import Daemon, install_signal_handlers

    cfg = _load(args)
    logs.setup(cfg.logging.level, cfg.logging.format)
    for warning in cfg.warnings:
        structlog.get_logger("destfnd").warning("config_warning", warning=warning)
    daemon = Daemon(cfg)

    async def run() -> None:
        install_signal_handlers(daemon)
        await daemon.run()

    try:
        import uvloop
    except ImportError:  # optional: uvloop makes the HTTP client about a third faster
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(run())
    except DestfndError:
        raise  # a clear one-line reason (cannot listen, database locked, ...)
    except Exception:  # a long-lived task died: say so once, exit non-zero for systemd
        structlog.get_logger("destfnd").exception("daemon_crashed")
        return EXIT_ERROR
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from destfnd.deliverers import check_destinations
    from destfnd.listen import check_listen

    cfg = _load(args)
    for warning in cfg.warnings:
        _print_item("warning: ", warning)

    async def check() -> tuple[list[str], list[str]]:
        # The listen address first: it is the first thing serve does.
        problems, warnings = await check_listen(cfg.server.host, cfg.server.port)
        found, warned = await check_destinations(cfg)
        return problems + found, warnings + warned

    problems, warnings = asyncio.run(check())
    for warning in warnings:
        _print_item("warning: ", warning)
    if problems:
        raise ConfigError(problems)
    kinds = ", ".join(
        f"{d.name} ({d.kind}{'' if d.enabled else ', disabled'})" for d in cfg.destinations
    )
    kinds = kinds or "none"
    print(f"{cfg.path}: ok")
    print(f"  sources: {', '.join(s.name for s in cfg.sources)}")
    print(f"  destinations: {kinds}")
    print(f"  database: {cfg.storage.path}")
    return EXIT_OK


def cmd_run_function(args: argparse.Namespace) -> int:
    from destfnd import run_function as rf

    rf.check_file(Path(args.file))
    events, batch = rf.read_events(args.event, sys.stdin.isatty())
    settings = rf.parse_settings(args.settings)
    memory_limit = DestinationConfig(name="", kind="").memory_limit_bytes  # as a destination's
    result = asyncio.run(
        rf.run(Path(args.file), events, batch, settings.values, insert=args.insert,
               timeout_s=args.timeout, memory_limit_bytes=memory_limit,
               secrets=settings.secrets, hidden_env=settings.hidden_env)
    )  # fmt: skip
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result.report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(rf.render(result, batch, args.insert))
    return EXIT_OK if result.ok else EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
