"""Webhooks and uploads to receivers that never answer hold a bounded number of sockets; none is lost."""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.test_outbound import real_transport
from upscale_server.delivery import WebhookSender, upload_output
from upscale_server.errors import UploadFailedError
from upscale_server.outbound import OutboundClient, OutboundPolicy

TASK = "6f1c2a9e-4b8d-4c1e-9a55-1f2e3d4c5b6a"


class SilentReceiver:
    """Accepts connections, reads what comes, never answers; counts connections open at once."""

    def __init__(self) -> None:
        self.open = self.most_open = self.total = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.total += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while await reader.read(65536):
                pass
        finally:
            self.open -= 1
            writer.close()


def test_deliveries_in_flight_are_bounded_and_the_rest_wait_their_turn() -> None:
    async def scenario() -> tuple[SilentReceiver, Counter[str], bool]:
        receiver = SilentReceiver()
        server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        policy = OutboundPolicy.parse(["127.0.0.1"], connect_timeout=1.0, total_timeout=0.3)
        client = OutboundClient(policy, transport=real_transport(), max_deliveries=2)
        results: Counter[str] = Counter()
        sender = WebhookSender(client, max_attempts=1, on_result=lambda result: results.update([result]))
        try:
            for _ in range(5):
                sender.send(f"http://127.0.0.1:{port}/hook", {"data": []}, task_uuid=TASK)
            upload_failed = False
            try:  # an upload shares the slots: it waits behind the webhooks, then times out on its own
                await upload_output(client, f"http://127.0.0.1:{port}/put", b"png", "image/png")
            except UploadFailedError:
                upload_failed = True
            await sender.aclose(timeout=10)
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()
        return receiver, results, upload_failed

    receiver, results, upload_failed = asyncio.run(scenario())
    assert receiver.most_open == 2
    assert receiver.total == 6  # every webhook and the upload were sent in the end: none was dropped
    assert results["given_up"] == 5 and upload_failed
