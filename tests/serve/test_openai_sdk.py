"""End-to-end: the official ``openai`` Python SDK (sync and async) as the client of raylane's
serving app on real vLLM (CPU, tiny model). One app for the module, reached only through the SDK:
what a user's code would do. It covers models, chat and completions, streaming with usage, ``n``,
``seed``, logprobs, JSON-schema output, tool calling, the SDK's typed errors, and 32 concurrent
async streams.

The tiny model has random weights, so tests assert what holds for any weights: shapes, counts,
schema-valid JSON under guided decoding, equal output for equal seeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import jsonschema
import openai
import pytest

from tests.conftest import restore_environ

pytestmark = [pytest.mark.slow, pytest.mark.ray]

KEY, OTHER_KEY, LIMITED_KEY = "sdk-key", "sdk-key-2", "sdk-key-limited"
MODEL = "tiny"
# Buckets are per key: the main keys never come near BURST; LIMITED_KEY is spent on purpose.
RPM, BURST = 60, 100
WEATHER_ARGS = {
    "type": "object",
    # Enums and booleans only: a random-weight model fills free strings or numbers until max_tokens.
    "properties": {"city": {"enum": ["Paris", "Berlin", "Tokyo"]}, "celsius": {"type": "boolean"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                      "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris"]}},
                                                     "required": ["city"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tiny_model, storage_root, ray_local):
    from ray import serve

    from runtime.serving import start_serving
    from runtime.specs import parse_spec

    saved = {k: os.environ.get(k) for k in ("RAYLANE_API_KEYS", "RAYLANE_API_KEYS_FILE")}
    os.environ["RAYLANE_API_KEYS"] = f"{KEY},{OTHER_KEY},{LIMITED_KEY}"
    os.environ.pop("RAYLANE_API_KEYS_FILE", None)
    spec = parse_spec({
        "kind": "OnlineInference", "name": "sdk-chat", "model": str(tiny_model), "model_id": MODEL,
        "max_model_len": 512, "max_tokens_limit": 128, "max_num_seqs": 32,
        "storage": {"root": str(storage_root)}, "slo": {"ttft_ms_p95": 1000},
        "rate_limit": {"requests_per_minute": RPM, "burst": BURST},
        # xlam parses plain JSON tool-call arrays, which guided decoding can make a random model write.
        "tool_calling": {"parser": "xlam"},
        # Compact guided JSON: a random model would otherwise pad it with whitespace until max_tokens.
        "engine_kwargs": {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}},
    })
    result = start_serving(spec, port=0, timeout_s=600)
    yield spec, f"{result.url}/v1"
    serve.shutdown()
    restore_environ(saved)


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served[1], api_key=KEY, timeout=120) as c:
        yield c


def test_models_chat_and_completions(client):
    assert MODEL in [m.id for m in client.models.list()]
    chat = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    assert isinstance(chat, openai.types.chat.ChatCompletion)
    assert chat.object == "chat.completion" and chat.model == MODEL
    assert isinstance(chat.choices[0].message.content, str) and chat.choices[0].message.role == "assistant"
    assert 0 < chat.usage.completion_tokens <= 8
    done = client.completions.create(model=MODEL, prompt="Ray runs", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert isinstance(done, openai.types.Completion)
    assert done.usage.completion_tokens == 6 and done.choices[0].text


def test_streaming_with_usage(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=10, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    *deltas, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 10  # include_usage: a last, usage-only chunk
    assert all(c.usage is None for c in deltas)
    assert "".join(c.choices[0].delta.content or "" for c in deltas if c.choices)
    chunks = list(client.completions.create(model=MODEL, prompt="count", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 5 and "".join(c.choices[0].text for c in chunks if c.choices)


def test_n_choices_and_seed_reproducibility(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, n=3, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]

    def sample(seed):
        return client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first  # the seed really drives sampling (16 random tokens of 512)


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)
    c = client.completions.create(model=MODEL, prompt="Ray", max_tokens=4, logprobs=2, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and all(len(t) >= 2 for t in lp.top_logprobs)


def test_response_format_json_schema(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_ARGS}})
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER_ARGS)


def _check_calls(calls, names=("get_weather",)):
    assert calls, "no tool_calls"
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_named_and_required_tool_choice_return_tool_calls(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=64,
                                       temperature=0)
    _check_calls(r.choices[0].message.tool_calls)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=96, temperature=0)
    _check_calls(r.choices[0].message.tool_calls, names=("get_weather", "get_time"))
    # Streamed: the SDK's deltas add up to one complete call.
    name, args = "", ""
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                                                max_tokens=64, temperature=0, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if d.function is not None:
                name += d.function.name or ""
                args += d.function.arguments or ""
    assert name == "get_weather"
    jsonschema.validate(json.loads(args), WEATHER_ARGS)


def test_auto_tool_choice_runs_the_parser(client):
    # Random weights: in "auto" the model's text is arbitrary; the request is accepted and answered.
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=8)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # Text shaped as xlam's call format (forced by a JSON schema) comes back parsed as tool_calls:
    # the parser ran on the model's output, which is what "auto" means.
    call_array = {"type": "array", "minItems": 1, "maxItems": 1, "items": {
        "type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER_ARGS},
        "required": ["name", "arguments"], "additionalProperties": False}}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=96, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "calls", "schema": call_array}})
    _check_calls(r.choices[0].message.tool_calls)
    assert r.choices[0].finish_reason == "tool_calls"


def test_typed_errors(served, client):
    _, url = served
    with openai.OpenAI(base_url=url, api_key="wrong-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
    assert e.value.status_code == 401 and e.value.request_id and "API key" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=4)
    assert "does not exist" in e.value.message and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10_000)
    assert "128" in e.value.message and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:  # the engine's own check (prompt over max_model_len)
        client.completions.create(model=MODEL, prompt="hello " * 800, max_tokens=4)
    assert "512" in e.value.message


def _spend(url: str, key: str) -> tuple[int, openai.RateLimitError]:
    """Requests with ``key`` (no SDK retries) until the guard answers 429."""
    with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as limited:
        for sent in range(1, 2 * BURST):
            try:
                limited.models.list()  # cheap: refused over the limit before any work
            except openai.RateLimitError as e:
                return sent, e
    pytest.fail(f"no 429 after {2 * BURST} requests")


def test_rate_limit_error_and_retry_after(served):
    _, url = served
    sent, err = _spend(url, LIMITED_KEY)
    assert sent > BURST  # the burst was honoured first
    assert err.status_code == 429 and err.request_id and "rate limit" in err.message
    assert 1 <= int(err.response.headers["retry-after"]) <= 60
    # Another key is not affected.
    with openai.OpenAI(base_url=url, api_key=OTHER_KEY, max_retries=0) as other:
        assert [m.id for m in other.models.list()] == [MODEL]
    # The SDK's default retries wait the Retry-After the guard sends, then succeed.
    sent, _ = _spend(url, LIMITED_KEY)
    assert sent <= 2  # still limited
    with openai.OpenAI(base_url=url, api_key=LIMITED_KEY, max_retries=2) as patient:
        t0 = time.monotonic()
        assert MODEL in [m.id for m in patient.models.list()]
    assert time.monotonic() - t0 >= 0.5


def test_async_client_32_concurrent_streams(served):
    _, url = served

    async def one(client, i):
        text, usage = "", None
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"stream {i}"}], max_tokens=6, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=url, api_key=KEY, timeout=300) as c:
            t0 = time.monotonic()
            results = await asyncio.gather(*(one(c, i) for i in range(32)))
            seconds = time.monotonic() - t0
            chat = await c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
            with pytest.raises(openai.NotFoundError):
                await c.completions.create(model="nope", prompt="x", max_tokens=2)
        async with openai.AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()
        return results, seconds, chat

    results, seconds, chat = asyncio.run(main())
    assert len(results) == 32
    assert all(text and usage is not None and usage.completion_tokens == 6 for text, usage in results)
    assert chat.choices[0].message.content is not None
    print(f"32 concurrent streams: {seconds:.1f} s")


def test_tool_parser_is_checked_when_the_app_is_built(tiny_model):
    from runtime.errors import RaylaneError
    from runtime.serving.app import check_tool_parser
    from runtime.specs import parse_spec

    def spec(parser):
        return parse_spec({"kind": "OnlineInference", "name": "x", "model": "tiny", "auth": "none",
                           "tool_calling": {"parser": parser}})

    with pytest.raises(RaylaneError, match="did you mean 'hermes'"):
        check_tool_parser(spec("hermse"), str(tiny_model))
    # llama3_json needs the <|python_tag|> token, which the tiny tokenizer lacks.
    with pytest.raises(RaylaneError, match="does not fit this model's tokenizer"):
        check_tool_parser(spec("llama3_json"), str(tiny_model))
    check_tool_parser(spec("hermes"), str(tiny_model))
