"""The one error type of the build: it names the file and the line."""

from __future__ import annotations

from pathlib import Path


class BuildError(Exception):
    """A problem in an input that stops the build, located as `file:line`."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")
