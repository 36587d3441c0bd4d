"""Cluster backends: Redis (or Valkey) for jobs, task records, sessions and the image index; S3 for images.

The same interfaces as the single process (:mod:`upscale_server.storage`, :mod:`upscale_server.queue`,
:mod:`upscale_server.sessions`), implemented on shared services so that any API node serves any request
and any worker runs any job. Only :mod:`upscale_server.backends` builds these. The semantics (what is
acknowledged when, who records a result, how a dead worker's job moves on) are in docs/scaling.md and in
the docstrings of :mod:`.jobs` and :mod:`.scripts`.
"""
