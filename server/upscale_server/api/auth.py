"""Authentication, decided once for both transports.

The rule lives here, once, and both transports call it. A REST request may open with an
``authentication`` task whose string ``apiKey`` is the credential, else ``Authorization: Bearer <key>``
is. A WebSocket connection authenticates with a frame that opens with an ``authentication`` task,
which must carry its key (it may also name a session to resume). With no keys configured the server
runs in open local mode and accepts any key.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path

from upscale_server.config import UnusableSettingError
from upscale_server.errors import InvalidApiKeyError, MissingApiKeyError
from upscale_server.protocol import AuthenticationTask, parse_task, task_identity


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

    def check(self, key: str | None) -> None:
        """Accept ``key`` or raise the Runware auth error; in open mode every key is accepted."""
        if self.open_mode:
            return
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

    def authenticate_request(self, raw_tasks: list[object], *, bearer: str | None) -> list[object]:
        """REST: check a request's key and return the tasks to run.

        The key is the leading authentication task's ``apiKey`` when that is a string, else ``bearer``
        (the ``Authorization`` header). MissingApiKeyError or InvalidApiKeyError (401) otherwise.
        """
        key = bearer
        if raw_tasks and task_identity(raw_tasks[0])[0] == "authentication":
            leading, raw_tasks = raw_tasks[0], raw_tasks[1:]
            presented = leading.get("apiKey") if isinstance(leading, dict) else None
            if isinstance(presented, str):
                key = presented
        self.check(key)
        return raw_tasks

    def authenticate_frame(self, raw_tasks: list[object]) -> tuple[AuthenticationTask, list[object]]:
        """WebSocket: check a frame that leads with an authentication task; returns it (parsed: it may
        name a session to resume) and the tasks after it. The task must carry its key: there is no
        header to stand in. MissingApiKeyError or InvalidApiKeyError (401) otherwise."""
        task = parse_task(raw_tasks[0])
        if not isinstance(task, AuthenticationTask):
            raise ValueError("authenticate_frame() needs a frame that leads with an authentication task")
        self.check(task.api_key)
        return task, raw_tasks[1:]
