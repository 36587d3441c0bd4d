"""API keys: from settings (a list and/or a file); none configured means open local mode."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence

from upscale_server.config import Settings
from upscale_server.errors import InvalidApiKeyError, MissingApiKeyError

log = logging.getLogger(__name__)


class ApiKeys:
    """Checks keys in constant time: every configured key is compared, whatever matches first."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [key.encode("utf-8", "surrogatepass") for key in keys if key]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        keys = list(settings.api_keys)
        if settings.api_keys_file is not None:
            lines = settings.api_keys_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls(keys)

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
