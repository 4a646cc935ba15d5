"""The official OpenAI Python client (openai, pinned in requirements.txt) against a
running hearth server, with nothing changed but its base URL and key.

Env: OPENAI_BASE_URL (http://127.0.0.1:PORT/v1) and OPENAI_API_KEY (hearth's token).
HEARTH_MODEL_NAME overrides the model (default hearth/demo).

A plain script: every check runs, failures are reported with their traceback, the last
line is `openai: N passed, N failed`, and the exit status is non-zero if any failed.
Each check runs under a SIGALRM deadline, and the client has its own timeout.
"""
import concurrent.futures
import json
import os
import signal
import sys
import time
import traceback
import typing

import openai
import pydantic
from openai import OpenAI

MODEL = os.environ.get("HEARTH_MODEL_NAME", "hearth/demo")
CHECK_TIMEOUT = float(os.environ.get("CLIENT_CHECK_TIMEOUT", "90"))
client = OpenAI(timeout=60, max_retries=0)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about hearths."},
]

passed, failed = [], []
print(f"openai (python) {openai.__version__} against {client.base_url}, model {MODEL}", flush=True)


def _on_alarm(signum, frame):  # noqa: ARG001
    raise TimeoutError(f"check did not finish within {CHECK_TIMEOUT:g}s")


signal.signal(signal.SIGALRM, _on_alarm)


def check(name):
    def wrap(fn):
        started = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, CHECK_TIMEOUT)
        try:
            fn()
            signal.setitimer(signal.ITIMER_REAL, 0)
            passed.append(name)
            print(f"ok   {name} ({time.monotonic() - started:.2f}s)", flush=True)
        except BaseException:  # noqa: BLE001
            signal.setitimer(signal.ITIMER_REAL, 0)
            failed.append(name)
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        return fn

    return wrap


@check("models.list and models.retrieve")
def _():
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids, ids
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model" and isinstance(m.created, int), m


@check("chat: a completion with usage and finish_reason")
def _():
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, seed=3, temperature=0.7, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content, r
    assert c.finish_reason == "length", c.finish_reason
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens > 5, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@check("chat: the stream's text equals the whole answer for one seed; include_usage")
def _():
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=16, seed=11, temperature=0.9)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole, (text, whole)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1, chunks[-1]
    assert any(ch.choices and ch.choices[0].finish_reason for ch in chunks)


@check("chat: n=2 gives two choices")
def _():
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=2, seed=5, temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1], r.choices
    assert all(c.message.content for c in r.choices), r.choices
    assert r.usage.completion_tokens == 12, r.usage


@check("chat: stop ends before the stop sequence")
def _():
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[5:7]
    assert len(stop) == 2, full
    r = client.chat.completions.create(stop=[stop], **kw).choices[0]
    assert r.finish_reason == "stop", r
    assert stop not in r.message.content and full.startswith(r.message.content), (r.message.content, full, stop)


@check("logprobs: chat's content entries and completions' lists, typed by the client")
def _():
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6, content
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2, e
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token, e
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4, e  # greedy
    c = client.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5, lp
    assert lp.text_offset[0] == 0 and all(t in d for t, d in zip(lp.tokens, lp.top_logprobs)), lp


@check("completions: a prompt list, echo and usage")
def _():
    r = client.completions.create(model=MODEL, prompt=["Once", "Twice"], max_tokens=4, echo=True, extra_body={"ignore_eos": True})
    assert [c.text[:4] for c in r.choices] == ["Once", "Twic"], r.choices
    assert r.usage.completion_tokens == 8, r.usage


@check("errors: 400 naming the param, 404 for an unknown model")
def _():
    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=7)
        raise AssertionError("no error")
    except openai.BadRequestError as e:
        assert e.body["param"] == "temperature", e.body
    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, logit_bias={"5": 10})
        raise AssertionError("no error")
    except openai.BadRequestError as e:
        assert e.body["param"] == "logit_bias", e.body
    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[{"type": "function", "function": {"name": "has space"}}])
        raise AssertionError("no error")
    except openai.BadRequestError as e:
        assert e.body["param"] == "tools[0].function.name", e.body
    try:
        client.chat.completions.create(model="nobody/nothing", messages=MESSAGES)
        raise AssertionError("no error")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body


@check("errors: 401 with a wrong key")
def _():
    bad = OpenAI(api_key="not-the-token", timeout=30, max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("no error")
    except openai.AuthenticationError:
        pass


@check("32 concurrent chat requests all succeed")
def _():
    def one(i):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"n {i}"}], max_tokens=8, seed=i)
        return r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        reasons = list(pool.map(one, range(32)))
    assert len(reasons) == 32 and all(r in ("stop", "length") for r in reasons), reasons


class Sky(pydantic.BaseModel):
    sky: typing.Literal["clear", "cloudy", "stormy"]
    windy: bool
    temperature_band: typing.Literal["cold", "mild", "hot"]


@check("chat.completions.parse with a Pydantic model (structured outputs)")
def _():
    r = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Sky, max_tokens=64, seed=3)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    assert isinstance(m.parsed, Sky), m
    assert Sky.model_validate_json(m.content) == m.parsed


@check("response_format: an unsupported keyword is a 400 naming it")
def _():
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    try:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
        raise AssertionError("no error")
    except openai.BadRequestError as e:
        assert e.body["param"] == "response_format.json_schema.schema", e.body
        assert "uniqueItems" in e.body["message"] and "/properties/tags" in e.body["message"], e.body


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


def _check_weather_call(call):
    assert call.type == "function" and call.function.name == "get_weather", call
    assert call.id.startswith("call_"), call
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"}, args
    assert args["unit"] in ("celsius", "fahrenheit") and 1 <= len(args["city"]) <= 16, args


@check("tools: a forced call, whole and streamed (the client's stream helper), then its result")
def _():
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, tools=[WEATHER_TOOL], parallel_tool_calls=False, max_tokens=128, seed=3)
    r = client.chat.completions.create(messages=ask, tool_choice="required", **kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert len(c.message.tool_calls) == 1, c.message
    _check_weather_call(c.message.tool_calls[0])
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.chat.completions.stream(messages=ask, tool_choice=named, **kw) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls", final.choices[0]
    _check_weather_call(final.choices[0].message.tool_calls[0])
    call = c.message.tool_calls[0]
    history = ask + [c.message, {"role": "tool", "tool_call_id": call.id, "content": "21 degrees, clear"}]
    r2 = client.chat.completions.create(messages=history, tool_choice="none", **kw)
    assert r2.choices[0].message.content is not None and not r2.choices[0].message.tool_calls, r2


print(f"openai: {len(passed)} passed, {len(failed)} failed", flush=True)
sys.exit(1 if failed else 0)
