"""check-config's part for functions: every destination's function files loaded in a worker,
as serve would load them (as user nobody when run as root), and what they report: problems
and warnings, each under its dotted key path.
"""

from __future__ import annotations

import os
import pwd
import re
import sys
from dataclasses import replace

from destfnd.config import Config, DestinationConfig, config_secrets, secret_env_names
from destfnd.function_destination import load_problem, problems_of, spec_for, warnings_of
from destfnd.redact import Redactor
from destfnd.sandbox.pool import Pool
from destfnd.sandbox.process import InitError, Spec


async def check_functions(cfg: Config) -> list[tuple[DestinationConfig, list[str], list[str]]]:
    """Load every destination's function files in a worker, as `serve` would (a disabled
    destination's too); returns, per destination with a function, its problems (dotted
    paths) and warnings. For `check-config` (`deliverers.check_destinations`)."""
    return [
        (dest, *await _check_destination(cfg, dest, f"destinations[{i}]"))
        for i, dest in enumerate(cfg.destinations)
        # (A disabled destination's function file may be missing: the config warned.)
        if (dest.kind == "function" and dest.function is not None)
        or dest.insert_function is not None
    ]


async def _check_destination(
    cfg: Config, dest: DestinationConfig, where: str
) -> tuple[list[str], list[str]]:
    # What a function prints or raises while it loads may hold a secret it was given.
    redact = Redactor(config_secrets(cfg))
    spec = spec_for(dest, secret_env_names(cfg))
    if os.geteuid() == 0:
        # Run as root (`sudo destfnd check-config`, to read the credentials): the function
        # files' module code runs as nobody, as it would under the unit's dynamic user, not
        # as root. Settings and secrets come from this process, as from serve.
        spec = replace(spec, run_as=_nobody())
    pool = Pool(spec, redact=redact)
    try:
        ready = await pool.start()
    except InitError as exc:
        problem = load_problem(exc, dest, where, redact)
        if spec.run_as is not None and _maybe_nobodys_alone(str(exc), spec):
            # Maybe nobody's failure only (a module, a package or Python itself it cannot
            # read; a container that cannot switch users): serve's user may not meet it.
            # A warning, as check-config's other findings that depend on the user.
            return [], [
                f"{problem} (run as root, check-config loads function files as user nobody,"
                " never as root: check that the service's user can read the function's folder,"
                " its modules and packages)"
            ]
        return [problem], []
    finally:
        await pool.close()
    redact.add_settings(ready.get("secret_settings", []), spec.settings)
    problems = [redact(p) for p in problems_of(ready, where)]
    return problems, [redact(w) for w in warnings_of(ready, dest, where)]


_NOT_AS_NOBODY = ("PermissionError", "Permission denied", "cannot run as user")


def _maybe_nobodys_alone(error: str, spec: Spec) -> bool:
    """Whether a load that failed as nobody may succeed as the service's user (see
    _check_destination): a file nobody may not read (a module, an extension's library), a
    worker that could not switch users, or a module nobody could not find where this
    process (root) finds it."""
    if any(text in error for text in _NOT_AS_NOBODY):
        return True
    missing = re.search(r"ModuleNotFoundError: No module named '([^']+)'", error)
    if missing is None:
        return False
    folders = [str(p.parent) for p in (spec.function, spec.insert) if p is not None]
    return _on_path(missing.group(1), [*folders, *(p for p in sys.path if p)])


def _on_path(name: str, path: list[str]) -> bool:
    """Whether the module `name` (dotted: each package on the way) is in the folders of
    `path`, found as the file system's finders find it, so that none of its code runs (here,
    as root): not through sys.meta_path, where a finder may import (setuptools' shim does)."""
    from importlib.machinery import PathFinder

    parts = name.split(".")
    if parts[0] in sys.builtin_module_names:
        return len(parts) == 1
    search: list[str] | None = path
    for i in range(len(parts)):
        if search is None:  # the one before is a module, not a package
            return False
        try:
            spec = PathFinder.find_spec(".".join(parts[: i + 1]), search)
        except (ImportError, ValueError, OSError):
            return False
        if spec is None:
            return False
        search = list(spec.submodule_search_locations or []) or None
    return True


def _nobody() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534
