"""Authentication, decided once for both transports.

The rule lives here, once, and both transports call it. A REST request may open with an
``authentication`` task whose string ``apiKey`` is the credential, else ``Authorization: Bearer <key>``
is. A WebSocket connection authenticates with a frame that opens with an ``authentication`` task,
which must carry its key (it may also name a session to resume). With no keys configured the server
runs in open local mode and accepts any key.

Keys also separate clients: what a request creates (its task records, its WebSocket session) belongs
to the key's *owner*, a hash of the key (the key itself is never stored), and is found only with the
same key. Open mode has one owner, ``''``: every client is the same tenant.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from pathlib import Path

from upscale_server.config import UnusableSettingError
from upscale_server.errors import InvalidApiKeyError, MissingApiKeyError
from upscale_server.protocol import AuthenticationTask, parse_task, task_identity

#: Hex digits of SHA-256 kept as an owner: 128 bits, which no two keys share by chance.
OWNER_HEX_DIGITS = 32


def owner_of(key: str) -> str:
    """The tenant of an accepted ``key``, as the stores keep it: a hash, so a leaked database or Redis
    holds no usable key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:OWNER_HEX_DIGITS]


class ApiKeys:
    """Checks keys in constant time: every configured key is compared, whatever matches first."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [key.encode("utf-8", "surrogatepass") for key in keys if key]

    @classmethod
    def load(cls, keys: Sequence[str], keys_file: Path | None) -> ApiKeys:
        """The keys given, plus one per line of ``keys_file`` (blank lines and ``#`` comments skipped).

        Fails closed with an :class:`UnusableSettingError`: the server must not start without the keys it
        was told to require, so a blank key (``--api-key ''``), an unreadable file and a file without a
        key stop it instead of leaving it in open mode. No key at all (``[]``, the default) is open mode."""
        if any(not key.strip() for key in keys):
            raise UnusableSettingError("api_keys holds an empty or blank key: give real keys, or none for open mode")
        loaded = list(keys)
        if keys_file is not None:
            try:
                lines = keys_file.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise UnusableSettingError(f"api_keys_file {keys_file} cannot be read: {reason}") from None
            from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not from_file:
                raise UnusableSettingError(f"api_keys_file {keys_file} holds no key (only blank lines or # comments)")
            loaded += from_file
        return cls(loaded)

    @property
    def open_mode(self) -> bool:
        return not self._keys

    def check(self, key: str | None) -> str:
        """Accept ``key`` and return its owner, or raise the Runware auth error; in open mode every key is
        accepted and every client is the one owner ``''``."""
        if self.open_mode:
            return ""
        if not key:
            raise MissingApiKeyError(
                "no API key: send Authorization: Bearer <key> or an authentication task first",
                parameter="apiKey",
            )
        candidate = key.encode("utf-8", "surrogatepass")  # JSON admits lone surrogates; they match no key
        matched = False
        for known in self._keys:
            matched |= hmac.compare_digest(candidate, known)
        if not matched:
            raise InvalidApiKeyError("Invalid API key.", parameter="apiKey")
        return owner_of(key)

    def authenticate_request(self, raw_tasks: list[object], *, bearer: str | None) -> tuple[str, list[object]]:
        """REST: check a request's key; returns its owner and the tasks to run.

        The key is the leading authentication task's ``apiKey`` when that is a string, else ``bearer``
        (the ``Authorization`` header). MissingApiKeyError or InvalidApiKeyError (401) otherwise.
        """
        key = bearer
        if raw_tasks and task_identity(raw_tasks[0])[0] == "authentication":
            leading, raw_tasks = raw_tasks[0], raw_tasks[1:]
            presented = leading.get("apiKey") if isinstance(leading, dict) else None
            if isinstance(presented, str):
                key = presented
        return self.check(key), raw_tasks

    def authenticate_frame(self, raw_tasks: list[object]) -> tuple[str, AuthenticationTask, list[object]]:
        """WebSocket: check a frame that leads with an authentication task; returns the key's owner, the
        task (parsed: it may name a session to resume) and the tasks after it. The task must carry its
        key: there is no header to stand in. MissingApiKeyError or InvalidApiKeyError (401) otherwise."""
        task = parse_task(raw_tasks[0])
        if not isinstance(task, AuthenticationTask):
            raise ValueError("authenticate_frame() needs a frame that leads with an authentication task")
        return self.check(task.api_key), task, raw_tasks[1:]
