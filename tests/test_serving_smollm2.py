"""calm serve on the embedded model (slow): lossless requests draft (speculative cycles) and still give the
full model's exact text, calm-mode requests share the batch and equal their solo runs, and chat's streamed
text equals its whole text."""

from __future__ import annotations

import asyncio

import pytest
from openai import AsyncOpenAI, OpenAI

from calm import CalmModel
from calm.prompts.documents import read_jsonl, summary_prompt
from serving_helpers import base_url, running

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
DATA = "../shared/data/xsum/smoke.jsonl"
NEW = 16


@pytest.fixture(scope="module")
def model():
    return CalmModel.from_pretrained("smollm2")


@pytest.fixture(scope="module")
def prompts():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / DATA
    return [summary_prompt(" ".join(r.document.split()[:150])) for r in read_jsonl(path, limit=4)]


def ask(client, prompt: str, **kwargs):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=NEW, **kwargs
    )


def test_lossless_and_calm_requests_together_equal_their_solo_runs(model, prompts):
    settings = [None, {"threshold": 0.9}, None, {"mode": "calm", "threshold": 0.8}]
    solos = [
        model.generate(p, max_new_tokens=NEW, policy=model.policy(threshold=s["threshold"]) if s else None)
        for p, s in zip(prompts, settings)
    ]
    with running(model, max_batch=8) as server:
        client = OpenAI(base_url=base_url(server), api_key="none", max_retries=0)
        alone = ask(client, prompts[0])  # one live row: lossless drafts
        calm = alone.model_extra["calm"]
        spec = calm["speculative"]
        assert spec["cycles"] < alone.usage.completion_tokens, calm
        assert spec["drafted"] >= spec["accepted_drafts"] > 0, calm
        assert spec["acceptance"] == pytest.approx(spec["accepted_drafts"] / spec["drafted"], abs=1e-3), calm
        assert "speculative" in calm["decoding"]
        assert alone.choices[0].message.content.strip() == solos[0].texts[0]
        streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, prompts[0], stream=True) if c.choices)
        assert streamed == alone.choices[0].message.content

        async def together():
            aclient = AsyncOpenAI(base_url=base_url(server), api_key="none", max_retries=0)
            calls = [
                aclient.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": p}],
                    max_tokens=NEW,
                    extra_body={"calm": s} if s else None,
                )
                for p, s in zip(prompts, settings)
            ]
            return await asyncio.gather(*calls)

        results = asyncio.run(together())
    for i, (result, solo) in enumerate(zip(results, solos)):
        assert result.choices[0].message.content.strip() == solo.texts[0], f"request {i}"
        assert result.usage.completion_tokens == len(solo.token_ids[0]), f"request {i}"
        assert result.model_extra["calm"]["avg_layers"] == pytest.approx(solo.avg_layers, abs=1e-3), f"request {i}"
