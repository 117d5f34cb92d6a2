"""Starting the destinations: a deliverer per enabled destination (the built-in webhook or
file sink, or worker processes running the user's function), all or none."""

from __future__ import annotations

from destfnd.config import DISABLED_NOTE, Config, DestinationConfig, secret_env_names
from destfnd.dispatch import Deliverer
from destfnd.errors import DestfndError
from destfnd.function_check import check_functions
from destfnd.function_destination import FunctionDestination, FunctionLoadError
from destfnd.paths import AS_THIS_USER, database_problem
from destfnd.redact import Redactor
from destfnd.webhook import FileSink, Webhook, file_problem


class DestinationStartError(DestfndError):
    """A destination cannot start: its function does not load, or its file cannot be opened.
    Each problem with its dotted key path, as check-config lists them. `transient`: every
    problem is a function that ran out of time loading (it may load the next time)."""

    def __init__(self, problems: list[str], transient: bool = False) -> None:
        self.problems = problems
        self.transient = transient
        super().__init__("\n".join(problems))


def make_deliverer(
    dest: DestinationConfig, redactor: Redactor, where: str, hidden_env: tuple[str, ...] = ()
) -> Deliverer:
    builtin: Deliverer | None = None
    if dest.kind == "webhook":
        builtin = Webhook(dest, redactor)
    elif dest.kind == "file":
        builtin = FileSink(dest)
    if dest.kind == "function" or dest.insert_function is not None:
        return FunctionDestination(dest, redactor, builtin, where=where, hidden_env=hidden_env)
    assert builtin is not None
    return builtin


async def start_deliverers(cfg: Config, redactor: Redactor) -> dict[str, Deliverer]:
    """Start every enabled destination's deliverer (workers load the functions); on any failure
    close the ones started and raise one error listing every problem."""
    started: dict[str, Deliverer] = {}
    problems: list[str] = []
    transient = True
    hidden = secret_env_names(cfg)  # every destination's function gets its settings only
    try:
        for i, dest in enumerate(cfg.destinations):
            if not dest.enabled:
                continue
            where = f"destinations[{i}]"
            deliverer = make_deliverer(dest, redactor, where, hidden)
            try:
                await deliverer.start()
            except FunctionLoadError as exc:
                problems += exc.problems
                transient = transient and exc.transient
                continue
            except DestfndError as exc:  # the file destination's (also behind an insert)
                key = f"{where}.path" if dest.kind == "file" else where
                problems.append(f"{key}: {exc}")
                transient = False
                continue
            started[dest.name] = deliverer
        if problems:
            raise DestinationStartError(problems, transient)
    except BaseException:
        for deliverer in started.values():
            await deliverer.close()
        raise
    return started


async def check_destinations(cfg: Config) -> tuple[list[str], list[str]]:
    """What `serve` would find starting, for check-config: the database's file and folder,
    every function loaded in a worker, every file destination's `path` (nothing is created;
    of these files only an existing file destination's is opened, and closed). Returns the
    problems and the warnings. A disabled destination's problems are warnings, and so are
    findings that depend on permissions: serve may run as another user."""
    problems: list[str] = []
    warnings: list[str] = []

    def add(found: list[str], enabled: bool) -> None:
        if enabled:
            problems.extend(found)
        else:
            warnings.extend(p + DISABLED_NOTE for p in found)

    for dest, found, warned in await check_functions(cfg):
        warnings += warned
        add(found, dest.enabled)
    paths = [("storage.path", database_problem(cfg.storage.path), True)]
    paths += [
        (f"destinations[{i}].path", file_problem(dest.path), dest.enabled)
        for i, dest in enumerate(cfg.destinations)
        if dest.kind == "file" and dest.path is not None
    ]
    for key, problem, enabled in paths:
        if problem is None:
            continue
        line = f"{key}: {problem.text}"
        if problem.permission:
            warnings.append(line + AS_THIS_USER)
        else:
            add([line], enabled)
    return problems, warnings
