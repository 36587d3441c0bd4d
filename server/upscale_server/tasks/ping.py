"""``ping``: the keep-alive every SDK sends; answered at once, recorded nowhere."""

from __future__ import annotations

from upscale_server.protocol import Outcome, PingTask, pong_item
from upscale_server.tasks.dispatcher import Emit, RequestContext


async def handle_ping(task: PingTask, request: RequestContext, emit: Emit) -> None:
    await emit(Outcome(item=pong_item()))
