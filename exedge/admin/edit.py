"""
One change to the configuration file, all or nothing.

The file is read with tomlkit (a round-trip TOML library: comments, key
order and layout survive, so the admin's file stays the admin's), changed
in memory, rendered, and the rendered text is validated exactly as
C{exedge check-config} validates a file (L{exedge.admin.validate}). Only a
text the server would start on is written, and atomically: a temporary
file in the same directory, fsync'ed, given the old file's mode, renamed
over it, the directory fsync'ed. A refused change leaves the file byte for
byte as it was.

Passwords (C{-AuthenticationCredential}) go to their own 0600 file in
C{secrets/} beside the configuration, never into the TOML; the file is
written before the validation (which reads it, as start-up does) and taken
back if the change is refused.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile

import tomlkit
from tomlkit.exceptions import TOMLKitError

from exedge.config import Config, ConfigError, loads
from exedge.durable import fsync_dir, write_all

from .cmdlets import CmdletError
from .validate import validate


class ConfigFile:
    """The configuration file at C{path}, open for one change."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.original = f.read()
        except OSError as e:
            raise CmdletError(f"cannot read {path}: {e.strerror}") from None
        try:
            self.text = self.original.decode("utf-8")
            self.doc = tomlkit.parse(self.text)
        except (UnicodeDecodeError, TOMLKitError) as e:
            raise CmdletError(f"{path} cannot be edited: {e}") from None
        self._undo: list = []

    # -- the arrays of tables ([[send_connectors]] ...) --

    def tables(self, section: str) -> list:
        items = self.doc.get(section)
        if items is None:
            return []
        if not isinstance(items, list):
            raise CmdletError(f"{self.path}: {section} is not an array of tables ([[{section}]])")
        return list(items)

    def append(self, section: str, table) -> None:
        items = self.doc.get(section)
        if items is None:
            self.doc.add(tomlkit.nl())
            self.doc.append(section, tomlkit.aot())
            items = self.doc[section]
        elif len(items):
            last = items[-1]
            if not last.as_string().endswith("\n\n"):
                last.add(tomlkit.nl())       # a blank line between tables, as the file has them
        table.add(tomlkit.nl())               # and after it, when tables follow
        items.append(table)

    def remove(self, section: str, index: int) -> None:
        del self.doc[section][index]

    # -- files beside the configuration --

    def write_password(self, owner: str, username: str, password: str, taken: set) -> dict:
        """
        Store C{password} in C{secrets/<owner made safe>.password} beside the
        configuration (0600, created exclusively, never through a link) and
        return the C{{ username, password_file }} reference for the TOML.
        C{taken}: password files other entries use (never overwritten).
        """
        directory = os.path.join(os.path.dirname(self.path), "secrets")
        if os.path.islink(directory):
            raise CmdletError(f"{directory} is a symbolic link: refusing to write a password there")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise CmdletError(f"cannot create {directory}: {e.strerror}") from None
        base = re.sub(r"[^a-z0-9]+", "-", owner.lower()).strip("-")[:64] or "connector"
        for n in range(1, 101):
            target = os.path.join(directory, f"{base}{'' if n == 1 else f'-{n}'}.password")
            if target not in taken:
                break
        else:
            raise CmdletError(f"no free password file name for {owner!r} in {directory}")
        if os.path.islink(target) or (os.path.exists(target) and not os.path.isfile(target)):
            raise CmdletError(f"{target} is not a regular file: refusing to write a password there")
        try:
            with open(target, "rb") as f:
                before = f.read()
        except FileNotFoundError:
            before = None
        except OSError as e:
            raise CmdletError(f"cannot read {target}: {e.strerror}") from None
        _write_atomically(target, (password + "\n").encode("utf-8"), 0o600)
        self._undo.append((target, before))
        return {"username": username, "password_file": target}

    def _take_back(self) -> None:
        for target, before in reversed(self._undo):
            try:
                if before is None:
                    os.unlink(target)
                else:
                    _write_atomically(target, before, 0o600)
            except OSError:
                pass
        self._undo.clear()

    # -- the change itself --

    def rendered(self) -> str:
        text = self.doc.as_string()
        return text.rstrip("\n") + "\n" if text.strip() else text

    def commit(self, *, dry_run: bool = False) -> Config:
        """
        Validate the changed text and write it (unless C{dry_run}); the
        loaded new configuration. A text that would not load raises
        CmdletError listing each problem, the file untouched.
        """
        text = self.rendered()
        try:
            config = validate(text, self.path)
        except ConfigError as e:
            self._take_back()
            lines = "\n".join(f"  {p}" for p in e.problems)
            raise CmdletError(f"the change was refused ({self.path} is unchanged):\n{lines}") from None
        if dry_run:
            self._take_back()
            return config
        try:
            mode = stat.S_IMODE(os.stat(self.path).st_mode)
            with open(self.path, "rb") as f:
                if f.read() != self.original:
                    raise CmdletError(f"{self.path} changed while this change was made; run the line again")
            _write_atomically(self.path, text.encode("utf-8"), mode)
        except OSError as e:
            self._take_back()
            raise CmdletError(f"cannot write {self.path}: {e.strerror}") from None
        except CmdletError:
            self._take_back()
            raise
        return config

    def old_warnings(self) -> set:
        """The warnings the file had before the change (so that only new ones are shown)."""
        try:
            return {(w.key, w.message) for w in loads(self.text, self.path).warnings}
        except ConfigError:
            return set()


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    """A temporary file beside C{path}, written, fsync'ed, given C{mode}, renamed over C{path}."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)
