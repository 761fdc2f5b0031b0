"""Deployment over HTTP: `latentfuse serve` (FastAPI + uvicorn) and `latentfuse client`.

Shared by both sides: `deploy` (settings) and `wire` (the transport's messages as bytes).
Server side only: `auth`, `persist`, `trainer`, `service`, `app`. Client side only: `remote`,
`client_job`. The two sides never import each other (checked by tests/test_http_wire.py).
"""
