"""calm serve through the real `openai` client (calm.serving): completions and chat, whole and streamed,
16 concurrent requests each equal to its solo CalmModel.generate run under its own calm settings, stop
strings, a client that leaves mid-stream, and a clean shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest
from openai import AsyncOpenAI, OpenAI

from helpers import DOCS
from serving_helpers import MODEL, base_url, get, post, running, slow_down, tiny_chat_model, wait_until

pytestmark = pytest.mark.usefixtures("one_thread")
LONG = "team won game"  # a prompt the tiny model continues for 200 tokens without EOS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def server(model, one_thread):
    with running(model, max_batch=4) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=base_url(server), api_key="none", max_retries=0)


def streamed(stream) -> tuple[str, str | None, object, dict | None]:
    """The text, finish reason, usage and calm object of a streamed completion or chat completion."""
    text, reason, usage, calm = "", None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text += piece or ""
            reason = choice.finish_reason or reason
        calm = (chunk.model_extra or {}).get("calm", calm)
    return text, reason, usage, calm


def test_health_and_models(client, server):
    code, health = get(server, "/health")
    assert code == 200 and health["status"] == "ok" and health["in_flight"] == 0
    assert health["steps"] == server.engine.steps and "decode_s" in health["scheduler"]
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("max_tokens", [3, 40])
def test_completion_whole_and_streamed_agree_with_generate(client, model, max_tokens):
    prompt = DOCS[0]["document"]
    solo = model.generate(prompt, max_new_tokens=max_tokens, chat=False)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)
    choice = whole.choices[0]
    assert choice.text.strip() == solo.texts[0]
    assert choice.finish_reason == solo.finish_reasons[0]
    assert whole.usage.completion_tokens == len(solo.token_ids[0])
    assert whole.usage.prompt_tokens == len(model.tokenizer(prompt)["input_ids"])
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.model_extra["calm"] == {
        "mode": "lossless",
        "decoding": "lossless: full model (exact; no stored measurement finds speculative decoding faster)",
        "avg_layers": 4.0,
        "num_layers": 4,
    }
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}
    )
    text, reason, usage, calm = streamed(stream)
    assert (text, reason, usage, calm) == (choice.text, choice.finish_reason, whole.usage, whole.model_extra["calm"])


def test_chat_whole_and_streamed_agree_with_generate(client, model):
    prompt = DOCS[1]["document"]
    solo = model.generate(prompt, max_new_tokens=12, chat=True)
    messages = [{"role": "user", "content": prompt}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content.strip() == solo.texts[0]
    assert whole.choices[0].finish_reason == solo.finish_reasons[0]
    assert whole.usage.completion_tokens == len(solo.token_ids[0])
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    text, reason, usage, _ = streamed(stream)
    assert (text, reason, usage) == (message.content, whole.choices[0].finish_reason, whole.usage)


def test_a_stream_without_include_usage_has_no_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt=DOCS[0]["document"], max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


SETTINGS = [
    None,
    {"mode": "lossless"},
    {"mode": "calm", "threshold": 0.1},
    {"threshold": 0.3},  # a knob alone means mode "calm"
]


def solo_run(model, prompt: str, budget: int, calm: dict | None, seed: int | None):
    threshold = (calm or {}).get("threshold")
    policy = model.policy(threshold=threshold) if threshold is not None else None
    sampling = {"do_sample": True, "temperature": 0.8, "seed": seed} if seed is not None else {}
    return model.generate(prompt, max_new_tokens=budget, chat=False, policy=policy, **sampling)


def together(server, cases) -> list:
    """Every (prompt, budget, calm settings, seed) at once through the async openai client."""

    async def all_at_once():
        client = AsyncOpenAI(base_url=base_url(server), api_key="none", max_retries=0)
        calls = [
            client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=budget,
                temperature=0.8 if seed is not None else 0,
                seed=seed,
                extra_body={"calm": calm} if calm else None,
            )
            for prompt, budget, calm, seed in cases
        ]
        return await asyncio.gather(*calls)

    return asyncio.run(all_at_once())


def assert_solo(results, solos, cases) -> None:
    for i, (result, solo) in enumerate(zip(results, solos)):
        assert result.choices[0].text.strip() == solo.texts[0], f"request {i}"
        assert result.usage.completion_tokens == len(solo.token_ids[0]), f"request {i}"
        assert result.choices[0].finish_reason == solo.finish_reasons[0], f"request {i}"
        assert result.model_extra["calm"]["avg_layers"] == pytest.approx(solo.avg_layers, abs=1e-3), f"request {i}"
        assert result.model_extra["calm"]["mode"] == ("calm" if (cases[i][2] or {}).get("threshold") else "lossless")


def test_16_concurrent_greedy_requests_each_equal_their_solo_run(server, model):
    """Greedy requests with their own calm settings (lossless, two thresholds) and budgets share the batch."""
    cases = [(DOCS[i % 4]["document"], 4 + 3 * (i % 5), SETTINGS[i % 4], None) for i in range(16)]
    solos = [solo_run(model, *case) for case in cases]
    assert {round(s.avg_layers, 2) for s in solos} != {4.0}, "no request exited early: the settings do not differ"
    steps = server.engine.steps
    results = together(server, cases)
    assert server.engine.steps - steps < sum(len(s.token_ids[0]) for s in solos), "the requests did not batch"
    assert_solo(results, solos, cases)


def test_seeded_sampled_requests_beside_greedy_ones_equal_their_solo_runs(server, model):
    cases = [(DOCS[i % 4]["document"], 10, None, 7 + i if i % 2 else None) for i in range(8)]
    solos = [solo_run(model, *case) for case in cases]
    assert_solo(together(server, cases), solos, cases)


def test_seeded_sampled_requests_beside_exiting_rows_equal_their_solo_runs(server, model):
    cases = [
        (DOCS[i % 4]["document"], 12, {"threshold": 0.1} if i % 2 else None, None if i % 2 else 7 + i) for i in range(8)
    ]
    solos = [solo_run(model, *case) for case in cases]
    assert_solo(together(server, cases), solos, cases)


def test_stop_strings_end_the_text_and_free_the_slot(client, model, server):
    prompt = DOCS[0]["document"]
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30).choices[0].text
    words = full.split()
    stop = " ".join(words[3:5])  # two words in the middle of the output
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, stop=[stop, "zzz"])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 30
    text, reason, usage, _ = streamed(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=30, stop=stop, stream=True, stream_options={"include_usage": True}
        )
    )
    assert (text, reason, usage) == (cut.choices[0].text, "stop", cut.usage)
    assert wait_until(lambda: server.engine.in_flight == 0)


def test_a_client_that_leaves_mid_stream_frees_its_slot(model):
    """The leaving request is cancelled (its slot frees long before its budget), the others are unchanged."""
    with running(model, max_batch=2) as server:
        slow_down(server, 0.01)  # 200 tokens take at least 2 s
        client = OpenAI(base_url=base_url(server), api_key="none", max_retries=0)
        prompt = DOCS[2]["document"]
        solo = model.generate(prompt, max_new_tokens=8, chat=False)
        assert model.generate(LONG, max_new_tokens=200, chat=False).finish_reasons == ("length",)
        stream = client.completions.create(model=MODEL, prompt=LONG, max_tokens=200, stream=True)
        next(iter(stream))
        stream.close()  # the client leaves
        assert wait_until(lambda: server.engine.in_flight == 0 and server.engine.scheduler.live_rows == 0, 1.5)
        assert server.engine.scheduler.stats.new_tokens < 150
        others = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=8) for _ in range(2)]
        assert [o.choices[0].text.strip() for o in others] == [solo.texts[0]] * 2


def test_a_client_that_times_out_on_a_whole_response_frees_its_slot(model):
    with running(model, max_batch=1) as server:
        slow_down(server, 0.01)
        with pytest.raises(TimeoutError):
            post(server, "/v1/completions", {"prompt": LONG, "max_tokens": 200}, timeout=0.3)
        assert wait_until(lambda: server.engine.in_flight == 0, 1.5)
        assert server.engine.scheduler.stats.new_tokens < 150


def test_shutdown_lets_in_flight_requests_finish(model):
    with running(model, max_batch=2) as server:
        slow_down(server, 0.01)
        client = OpenAI(base_url=base_url(server), api_key="none", max_retries=0)
        stream = client.completions.create(model=MODEL, prompt=LONG, max_tokens=50, stream=True)
        chunks = iter(stream)
        next(chunks)
        server.stop()  # as SIGTERM: no new connections, in-flight requests finish
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"


def test_shutdown_cancels_what_outlives_the_grace_period(model):
    start = time.time()
    with running(model, max_batch=2, shutdown_timeout=0.5) as server:
        slow_down(server, 0.05)  # 200 tokens: 10 s
        client = OpenAI(base_url=base_url(server), api_key="none", max_retries=0)
        stream = client.completions.create(model=MODEL, prompt=LONG, max_tokens=200, stream=True)
        next(iter(stream))
        server.stop()
    assert time.time() - start < 8, "the server waited for the request instead of cancelling it"
    assert server.engine.in_flight == 0


def test_an_encoder_decoder_is_served_and_equals_its_solo_runs(tiny_model):
    """A tiny T5 (the word-level tokenizer): its prompts go to the encoder, rows join and leave the batch."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from calm import CalmModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = T5Config(
        d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=3, vocab_size=len(tokenizer),
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_factor=5.0,
    )  # fmt: skip
    import torch

    torch.manual_seed(0)
    model = CalmModel.from_model(T5ForConditionalGeneration(config).eval(), tokenizer)
    prompts = [d["document"] for d in DOCS]
    solos = [model.generate(p, max_new_tokens=6) for p in prompts]
    with running(model, max_batch=2) as server:
        cases = [(p, 6, None, None) for p in prompts]
        results = together(server, cases)
    for i, (result, solo) in enumerate(zip(results, solos)):
        assert result.choices[0].text.strip() == solo.texts[0], f"request {i}"
        assert result.usage.completion_tokens == len(solo.token_ids[0]), f"request {i}"
