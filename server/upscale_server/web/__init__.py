"""The browser playground: a single page at ``/`` that drives the server's own ``POST /v1`` API."""
