"""Where a config's values come from on this host: secrets (env, file, systemd credential)
and paths relative to the config file. Raises ValueError for Reader to collect; never prints
a secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from destfnd import config_values as cv
from destfnd.config import Secret, _why


class Unavailable(ValueError):
    """What the config names is not there (a function file, a secret): for a disabled
    destination, a warning."""


class Resolver:
    """Reads secrets and resolves paths; with `resolve` off (stats, deliveries: they send
    nothing and run no function) a secret is not read and a function file not looked for."""

    def __init__(self, base: Path, environ: Mapping[str, str], resolve: bool = True) -> None:
        self.base = base
        self.environ = environ
        self.resolve = resolve

    def secret(self, value: Any, inline_ok: bool = False) -> Secret:
        if isinstance(value, str) and value and inline_ok:
            return Secret(value, "inline")
        if value == "" and inline_ok:
            raise ValueError("must not be empty")
        if not isinstance(value, dict):
            kinds = "a string or " if inline_ok else ""
            example = '{ env = "NAME" }'
            raise ValueError(f"must be {kinds}a secret such as {example}, got {cv.show(value)}")
        for key in value:
            if key not in cv.SECRET_KEYS:
                raise cv.Invalid(f"unknown key{cv.hint(key, cv.SECRET_KEYS)}", f".{key}")
        if not cv.is_secret_ref(value) or not next(iter(value.values())):
            raise ValueError("a secret needs exactly one of env, file or credential (non-empty)")
        ((kind, ref),) = value.items()
        if not self.resolve:
            return Secret("", f"{kind}:{ref}")
        if kind == "env":
            if self.environ.get(ref):
                return Secret(self.environ[ref], f"env:{ref}")
            state = "empty" if ref in self.environ else "not set"
            raise Unavailable(f"environment variable {ref} is {state}")
        if kind == "credential":
            folder = self.environ.get("CREDENTIALS_DIRECTORY")
            if "/" in ref or ref in (".", ".."):
                raise cv.Invalid(f"must be a credential name, got {ref!r}", ".credential")
            if not folder:
                needs = "needs $CREDENTIALS_DIRECTORY (set by systemd LoadCredential=)"
                raise Unavailable(f"credential {ref} {needs}")
            file, origin = Path(folder, ref), f"credential:{ref}"
        else:
            file = self.path(ref)
            origin = f"file:{file}"
        try:
            text = file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            hint = ""
            if kind == "credential" and isinstance(exc, FileNotFoundError):
                hint = f" (is there a LoadCredential={ref}:... line in the unit?)"
            raise Unavailable(f"cannot read secret file {file}: {_why(exc)}{hint}") from None
        text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
        if not text:
            raise Unavailable(f"secret file {file} is empty")
        return Secret(text, origin)

    def path(self, value: Any) -> Path:
        """A path from the config, relative to the config file's folder."""
        text = cv.text(value)
        if "\0" in text:  # (the OS takes none: a traceback at each use)
            raise ValueError("a path must not contain a NUL character")
        return Path(os.path.abspath(self.base / Path(text).expanduser()))

    def file_path(self, value: Any) -> Path:
        """A file destfnd writes (created with its folders if need be): not a folder."""
        path = self.path(value)
        try:
            is_dir = path.is_dir()
        except PermissionError:  # a folder on the way this user cannot search: serve's may
            return path  # (check-config warns)
        except OSError as exc:
            raise ValueError(f"cannot look at {path}: {exc.strerror}") from None
        if is_dir:
            raise ValueError(f"is a directory, not a file: {path}")
        return path

    def code_file(self, value: Any) -> Path:
        path = self.path(value)
        if not self.resolve:  # stats, deliveries: they run no function
            return path
        if not path.is_file():
            raise Unavailable(f"{'not a file' if path.exists() else 'file not found'}: {path}")
        return path
