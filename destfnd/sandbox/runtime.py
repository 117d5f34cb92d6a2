"""Inside a worker: load user function files, check their SETTINGS, run handlers (what they
return or raise means: taxonomy.py, returns.py). Never imported by the daemon process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import difflib
import hashlib
import importlib.util
import inspect
import linecache
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from destfnd.spec import EVENT_TYPES

HANDLER_NAMES = (*(f"on_{t}" for t in EVENT_TYPES), "on_batch")
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
# Frames from these folders are plumbing: ours, and the thread hop of a plain `def` handler.
_PLUMBING = (
    _PACKAGE_DIR,
    os.path.dirname(asyncio.__file__),
    os.path.dirname(concurrent.futures.__file__),
)
_SETTING_FIELDS = ("type", "required", "secret", "description")
_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}

# Other words for them: Python's, and Segment's settings editor's ("Text Map", "Sensitive").
_SETTING_TYPE_WORDS = {
    "str": "string", "text": "string", "bool": "boolean", "int": "integer", "float": "number",
    "dict": "object", "map": "object", "textmap": "object", "list": "array",
    "sensitive": '"string" with "secret": True',
}  # fmt: skip


class LoadError(Exception):
    """A function file could not be loaded; the message is one line for the user."""


def load_function(path: str, name: str, source: bytes | None = None) -> tuple[ModuleType, str]:
    """Import the file at `path` as module `name`; returns it and its version (content hash).
    `source`: the file's content as the daemon read it at start (every worker of a running
    daemon runs the same code, whatever happens to the file), else read now."""
    file = Path(path)
    if source is None:
        try:
            source = file.read_bytes()
        except OSError as exc:
            raise LoadError(f"{path}: cannot read: {exc.strerror}") from None
    version = hashlib.sha256(source).hexdigest()[:12]
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so a function can import its neighbours
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        if file.suffix in (".js", ".mjs", ".cjs", ".ts"):
            raise LoadError(
                f"{path}: JavaScript functions are not supported yet; write it in Python"
            )
        raise LoadError(f"{path}: not a Python file (.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # Tracebacks and inspect read lines through linecache: the lines of this code, not of
    # the file as it may be now (an mtime of None is never checked against the file).
    text = source.decode("utf-8", "replace")
    linecache.cache[path] = (len(text), None, text.splitlines(True), path)
    try:
        exec(compile(source, path, "exec", dont_inherit=True), module.__dict__)
    except SyntaxError as exc:
        where = f"{path}:{exc.lineno}" if exc.lineno else path
        raise LoadError(f"{where}: SyntaxError: {exc.msg}") from None
    except BaseException as exc:  # user code at import time: anything can happen
        raise LoadError(f"{path}{_user_line(exc, path)}: {describe(exc)}") from None
    for h in HANDLER_NAMES:
        value = getattr(module, h, None)
        if value is not None and not callable(value):
            raise LoadError(f"{path}: {h} is not a function (it is {type(value).__name__})")
    handlers = [h for h in HANDLER_NAMES if callable(getattr(module, h, None))]
    if not handlers:
        hint = "".join(f"; {m}" for m in near_misses(module))
        raise LoadError(f"{path}: defines no handler ({', '.join(HANDLER_NAMES)}){hint}")
    for name in handlers:
        _check_signature(path, name, getattr(module, name))
    return module, version


def _check_signature(path: str, name: str, handler: Any) -> None:
    """A handler is called as handler(event, settings) (on_batch: events, settings): one that
    cannot be is refused at load, not found out at its first event. So is a generator, whose
    body calling it would not even start."""
    if inspect.isgeneratorfunction(handler) or inspect.isasyncgenfunction(handler):
        code = getattr(inspect.unwrap(handler), "__code__", None)  # none on a partial
        where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else path
        raise LoadError(
            f"{where}: {name} is a generator (it has yield): "
            "a handler returns (or raises), it does not yield"
        )
    try:
        # Not through __wrapped__: a decorator's wrapper is what gets called.
        signature = inspect.signature(handler, follow_wrapped=False)
    except (TypeError, ValueError):  # no signature to read (a builtin): let it run
        return
    try:
        signature.bind(None, None)
    except TypeError:
        code = getattr(handler, "__code__", None)
        where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else path
        first = "events" if name == "on_batch" else "event"
        raise LoadError(
            f"{where}: {name}{signature} cannot be called as {name}({first}, settings)"
        ) from None


def near_misses(module: ModuleType) -> list[str]:
    """Functions of `module` whose names look like a misspelled handler ("ontrack",
    "on_identfy"), each as "did you mean on_track? (it has ontrack)"."""
    found = []
    for attr, value in vars(module).items():
        if attr in HANDLER_NAMES or not attr.lower().startswith("on"):
            continue
        if not inspect.isroutine(value):
            continue  # a class (OnTrack) or a constant
        if getattr(value, "__module__", None) != module.__name__:
            continue  # imported, not written here
        flat = attr.lower().replace("_", "")
        close = [h for h in HANDLER_NAMES if h.replace("_", "") == flat]
        close = close or difflib.get_close_matches(attr.lower(), HANDLER_NAMES, n=1, cutoff=0.9)
        if close:
            found.append(f"did you mean {close[0]}? (it has {attr})")
    return found


def _user_line(exc: BaseException, path: str) -> str:
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    return f":{lines[-1]}" if lines else ""


def describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a user's __str__ that raises
        text = "(its message could not be read: str() of it raised)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def user_traceback(exc: BaseException) -> str:
    """The traceback without destfnd's own frames: what the user needs to find their bug."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(_PLUMBING)
    ]  # fmt: skip
    text = "Traceback (most recent call last):\n" if frames else ""
    text += "".join(traceback.format_list(frames))
    return text + "".join(traceback.format_exception_only(type(exc), exc))


def check_settings(
    modules: list[tuple[str, ModuleType]], settings: dict
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Problems of `settings` against each module's SETTINGS (and of the declarations
    themselves), the keys declared secret, warnings (keys no SETTINGS declares), and those
    of the problems that are the declarations' own: a fault of the file, not of settings."""
    problems: list[str] = []
    declaring_problems: list[str] = []  # of them, the declarations' own

    def bad_declaration(problem: str) -> None:
        problems.append(problem)
        declaring_problems.append(problem)

    secret_keys: list[str] = []
    declared_keys: set[str] = set()
    declarations = 0
    declaring, silent = [], []  # files with SETTINGS, files without
    for path, module in modules:
        declared = getattr(module, "SETTINGS", None)
        file = Path(path).name
        if declared is None:
            silent.append(file)
            continue
        declaring.append(file)
        if not isinstance(declared, dict):  # (and no warning of keys it does not declare)
            bad_declaration(f"settings: SETTINGS in {file} must be a dict")
            continue
        declarations += 1
        declared_keys.update(map(str, declared))
        for key, spec in declared.items():
            where = f"settings.{key}: SETTINGS[{key!r}] in {file}"
            if not isinstance(spec, dict):
                bad_declaration(f"{where} must be a dict")
                continue
            if spec.get("secret"):
                secret_keys.append(str(key))
            for field in [f for f in spec if not isinstance(f, str) or f not in _SETTING_FIELDS]:
                hint = difflib.get_close_matches(str(field), _SETTING_FIELDS, n=1)
                known = (
                    f"did you mean {hint[0]!r}?" if hint else f"use {', '.join(_SETTING_FIELDS)}"
                )
                bad_declaration(f"{where} has an unknown field {field!r} ({known})")
            kind = spec.get("type")
            if kind is not None and (not isinstance(kind, str) or kind not in _SETTING_TYPES):
                types = ", ".join(_SETTING_TYPES)
                word = str(kind).lower().replace(" ", "")
                meant = _SETTING_TYPE_WORDS.get(word) or next(
                    iter(difflib.get_close_matches(word, _SETTING_TYPES, n=1, cutoff=0.75)), None
                )
                hint = f"did you mean {meant}? " if meant else ""
                bad_declaration(f"{where}: unknown type {kind!r} ({hint}use {types})")
                kind = None
            for flag in ("required", "secret"):
                if not isinstance(spec.get(flag, False), bool):
                    bad_declaration(f"{where}: {flag} must be true or false")
            about = f" ({spec['description']})" if spec.get("description") else ""
            if key not in settings:
                if spec.get("required"):
                    problems.append(f"settings.{key}: required by SETTINGS in {file}{about}")
                continue
            value = settings[key]
            if spec.get("required") is True and isinstance(value, str) and not value.strip():
                # As in Segment, where a required setting cannot be saved empty (an env
                # variable set to "" for a secret, say).
                problems.append(f"settings.{key}: required by SETTINGS in {file}{about}, and empty")
                continue
            if kind is None:
                continue
            wrong_bool = isinstance(value, bool) and kind != "boolean"
            if wrong_bool or not isinstance(value, _SETTING_TYPES[kind]):
                problems.append(f"settings.{key}: must be {kind}, got {type(value).__name__}")
    warnings = []
    if declarations:  # a key no SETTINGS declares is most likely misspelled
        for key in settings:
            if key not in declared_keys:
                hint = difflib.get_close_matches(key, sorted(declared_keys), n=1)
                also = f"did you mean {hint[0]!r}? " if hint else ""
                # An insert function and its destination's share the settings table: a key
                # of the one without SETTINGS is undeclared, not wrong.
                none = f"; {', '.join(silent)} declares none" if silent else ""
                warnings.append(f"settings.{key}: not declared in the SETTINGS of "
                                f"{', '.join(declaring)}{none} ({also}the function gets it "
                                "all the same)")  # fmt: skip
    return problems, secret_keys, warnings, declaring_problems


# A plain `def` handler's thread gets this much stack: RLIMIT_AS (memory_limit) counts each
# thread's whole stack, and at the usual 8 MB about 50 threads fill the default 512 MB.
THREAD_STACK_BYTES = 2 * 1024 * 1024
_threads: concurrent.futures.ThreadPoolExecutor | None = None


class _Threads(concurrent.futures.ThreadPoolExecutor):
    """Threads made with THREAD_STACK_BYTES of stack (those the function makes itself keep
    the default)."""

    def _adjust_thread_count(self) -> None:  # where ThreadPoolExecutor starts a thread
        previous = threading.stack_size(THREAD_STACK_BYTES)
        try:
            super()._adjust_thread_count()  # type: ignore[misc]
        finally:
            threading.stack_size(previous)


def set_threads(count: int, memory_limit_bytes: int = 0) -> None:
    """Up to `count` plain `def` handlers run at once (the destination's `concurrency`, so
    none waits for a thread while its `timeout` runs), and no more than a quarter of
    `memory_limit` in their stacks; threads are made as needed."""
    global _threads
    if memory_limit_bytes > 0:
        count = min(count, memory_limit_bytes // (4 * THREAD_STACK_BYTES))
    if _threads is not None:
        _threads.shutdown(wait=False)
    _threads = _Threads(max(1, count), thread_name_prefix="destfnd-handler")


_NOT_RUN = object()  # what a thread returns for a call cancelled before it got one


async def invoke(fn: Any, *args: Any, gate: Callable[[bool], bool] | None = None) -> Any:
    """Call a handler: `async def` on this loop, plain `def` on a thread (so blocking code
    does not stall the other invocations). `gate(True)` is asked once a thread has it: False
    (the call was cancelled while it waited for one) and it does not run; `gate(False)` is
    told when it returns. What a handler returns that can be awaited (a coroutine: `return
    fetch(...)`, as JavaScript functions return a promise) is awaited, so that its work is
    done and its errors count."""
    if inspect.iscoroutinefunction(fn):
        result = await fn(*args)
    else:
        if _threads is None:
            set_threads(8)
        context = contextvars.copy_context()  # the call's record, for print() and fetch()
        abandoned = False  # its thread did not start: answered already, it must not run

        def run() -> Any:
            if abandoned or (gate is not None and not gate(True)):
                return _NOT_RUN
            try:
                return context.run(fn, *args)
            finally:
                if gate is not None:
                    gate(False)

        try:
            result = await asyncio.get_running_loop().run_in_executor(_threads, run)
        except RuntimeError as exc:
            if "can't start new thread" not in str(exc):
                raise
            # Out of memory for one more stack (memory_limit), or of tasks (TasksMax): the
            # item is queued all the same, and a thread that frees up must not run it.
            abandoned = True
            raise MemoryError("no memory left to start a thread for a plain def handler") from None
        if result is _NOT_RUN:  # cancelled before a thread took it up
            raise asyncio.CancelledError
    if inspect.isawaitable(result):
        result = await result
    return result
