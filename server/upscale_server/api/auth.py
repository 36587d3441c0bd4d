"""Authentication, decided once for both transports.

A request (a REST body, a WebSocket frame) may open with an ``authentication`` task; its ``apiKey``
is the credential. REST may instead send ``Authorization: Bearer <key>``, which also stands in when the
leading task carries no string key. With no keys configured the server runs in open local mode and
accepts any key (but a leading authentication task must still carry one).
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

        An unreadable file is an :class:`UnusableSettingError`: the server must not start without the
        keys it was told to require."""
        loaded = list(keys)
        if keys_file is not None:
            try:
                lines = keys_file.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise UnusableSettingError(f"api_keys_file {keys_file} cannot be read: {reason}") from None
            loaded += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
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

    def authenticate(
        self, raw_tasks: list[object], *, bearer: str | None = None
    ) -> tuple[AuthenticationTask | None, list[object]]:
        """Check a request's credential; returns its leading authentication task (parsed) and the tasks after it.

        The key is the leading authentication task's ``apiKey`` when that is a string (an empty one is
        a missing key), else ``bearer`` (REST's ``Authorization`` header). Raises MissingApiKeyError or
        InvalidApiKeyError, both 401.
        """
        if not raw_tasks or task_identity(raw_tasks[0])[0] != "authentication":
            self.check(bearer)
            return None, raw_tasks
        leading, rest = raw_tasks[0], raw_tasks[1:]
        presented = leading.get("apiKey") if isinstance(leading, dict) else None
        if bearer is not None and not isinstance(presented, str):
            self.check(bearer)
            return None, rest
        task = parse_task(leading)
        assert isinstance(task, AuthenticationTask)
        self.check(task.api_key)
        return task, rest
