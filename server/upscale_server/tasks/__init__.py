"""Runware tasks -> jobs: input handling and the dispatcher shared by REST and WebSocket.

Sits between ``upscale_server.protocol`` (the wire models) and ``upscale_server.inference``/storage; it imports no web
framework, so everything here can be tested without a server.
"""
