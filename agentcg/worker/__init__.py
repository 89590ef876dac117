"""The inference worker: a paged-KV-cache LLM engine with an OpenAI-compatible
HTTP API (server) and a control socket for agentcgd (control).

Importing this package loads nothing heavy: torch, FastAPI and uvicorn are
imported by the modules that need them, so `agentcg.worker.control`'s
stdlib client can be used where torch is not installed.
"""
