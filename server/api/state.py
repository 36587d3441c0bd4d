"""What the transports share: built once in the app's lifespan, read by every request."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request, WebSocket

from server.api.auth import ApiKeys
from server.config import Settings
from server.storage.images import ImageStore
from server.tasks.dispatcher import TaskDispatcher


@dataclass
class ServerState:
    settings: Settings
    keys: ApiKeys
    images: ImageStore
    dispatcher: TaskDispatcher

    def base_url(self, connection: Request | WebSocket) -> str:
        """Where clients fetch images: the configured public URL, else the address they used."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        url = connection.base_url
        scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
        return str(url.replace(scheme=scheme)).rstrip("/")


def server_state(connection: Request | WebSocket) -> ServerState:
    state: ServerState = connection.app.state.server
    return state
