"""--api-key: the API answers 401 in OpenAI's shape without the bearer token (real tiny engine)."""
from __future__ import annotations

import asyncio

import httpx
from worker_harness import engine_config

from agentcg.worker.async_engine import AsyncEngine
from agentcg.worker.engine import Engine
from agentcg.worker.server import create_app


def test_api_key_is_required_when_set():
    aeng = AsyncEngine(Engine(engine_config(measure=False))).start()
    app = create_app(aeng, api_key="s3cret", model_name="tiny-served")

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as c:
            no = await c.get("/v1/models")
            wrong = await c.get("/v1/models", headers={"Authorization": "Bearer nope"})
            ok = await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            health = await c.get("/health")
            done = await c.post("/v1/completions", headers={"Authorization": "Bearer s3cret"},
                                json={"model": "tiny-served", "prompt": "ab", "max_tokens": 3, "temperature": 0})
            return no, wrong, ok, health, done

    try:
        no, wrong, ok, health, done = asyncio.run(run())
    finally:
        aeng.close()
    for r in (no, wrong):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny-served"
    assert health.status_code == 200            # health needs no key
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
