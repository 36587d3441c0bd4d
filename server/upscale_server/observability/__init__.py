"""Observability: Prometheus metrics, the health and readiness probes, and structured logs.

Cross-cutting on purpose: nothing here imports the API, tasks or inference packages, so any layer can
report to it (the dispatcher counts tasks, the worker runs jobs in their task's log context) without
import cycles, and the app wires it up once from the objects it already builds.

Import the submodules (``metrics``, ``health``, ``logs``) directly: this file re-exports nothing, so
that ``upscale_server.inference`` can use ``logs`` without pulling in FastAPI through ``health``.
"""
