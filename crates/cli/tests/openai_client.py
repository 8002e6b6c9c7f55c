"""The official `openai` client against a live `tern serve`.

Run by crates/cli/tests/openai.rs as: python openai_client.py BASE_URL KEY
Prints one line per check; any failure raises (a non-zero exit).
"""

import json
import sys
import urllib.error
import urllib.request

import openai

base_url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
question = [{"role": "user", "content": "What is the capital of France?"}]


def check(name, ok, detail=""):
    if not ok:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok: {name}")


models = [m.id for m in client.models.list()]
check("models", len(models) >= 1, models)
model = models[0]

whole = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=24, seed=1
)
text = whole.choices[0].message.content
check("chat reply", "Paris" in text, text)
usage = whole.usage
check(
    "usage adds up",
    usage.prompt_tokens > 0
    and usage.completion_tokens > 0
    and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
    usage,
)
check("finish reason", whole.choices[0].finish_reason in ("stop", "length"))

stream = client.chat.completions.create(
    model=model,
    messages=question,
    temperature=0,
    max_tokens=24,
    seed=1,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, last_usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        last_usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        finish = choice.finish_reason or finish
check("streamed equals whole", "".join(pieces) == text, ("".join(pieces), text))
check("streamed usage", last_usage is not None and last_usage.completion_tokens == usage.completion_tokens)
check("streamed finish", finish == whole.choices[0].finish_reason, finish)

two = client.chat.completions.create(
    model=model, messages=question, temperature=0.9, max_tokens=12, seed=7, n=2
)
check("n=2", [c.index for c in two.choices] == [0, 1], two.choices)
check(
    "n=2 usage",
    two.usage.completion_tokens > 0 and two.usage.prompt_tokens == usage.prompt_tokens,
    two.usage,
)
again = client.chat.completions.create(
    model=model, messages=question, temperature=0.9, max_tokens=12, seed=7, n=2
)
check(
    "n=2 is reproducible by seed",
    [c.message.content for c in again.choices] == [c.message.content for c in two.choices],
)

session = {"X-Tern-Session": "python-client-test"}
history = [{"role": "user", "content": "Name a colour."}]
turn1 = client.chat.completions.create(
    model=model, messages=history, temperature=0, max_tokens=16, extra_headers=session
)
history += [
    {"role": "assistant", "content": turn1.choices[0].message.content},
    {"role": "user", "content": "Name another one."},
]
turn2 = client.chat.completions.create(
    model=model, messages=history, temperature=0, max_tokens=16, extra_headers=session
)
cached = turn2.usage.prompt_tokens_details.cached_tokens
check(
    "a session's second turn prefills only what is new",
    cached >= turn1.usage.prompt_tokens,
    (cached, turn1.usage),
)

text_completion = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=6, temperature=0, stop=["."]
)
check("completion", "Paris" in text_completion.choices[0].text, text_completion.choices[0].text)

try:
    client.chat.completions.create(
        model=model,
        messages=question,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
    )
    raise AssertionError("tools were accepted")
except openai.BadRequestError as e:
    check("an unsupported field is a 400 naming it", e.body["param"] == "tools", e.body)

try:
    client.chat.completions.create(model="no-such-model", messages=question)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    check("an unknown model is a 404", e.body["param"] == "model", e.body)

try:
    client.chat.completions.create(model=model, messages=question, n=9)
    raise AssertionError("n=9 was accepted")
except openai.BadRequestError as e:
    check("n past 8 is a 400", e.body["param"] == "n", e.body)

# A body that is not JSON at all (no client sends one: raw HTTP).
request = urllib.request.Request(
    base_url.rstrip("/") + "/chat/completions",
    data=b'{"messages": [',
    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
)
try:
    urllib.request.urlopen(request, timeout=60)
    raise AssertionError("a body that is not JSON was accepted")
except urllib.error.HTTPError as e:
    error = json.loads(e.read())["error"]
    check(
        "a body that is not JSON is a 400 saying where",
        e.code == 400 and error["message"].startswith("the body is not valid JSON: EOF"),
        error,
    )

wrong = openai.OpenAI(base_url=base_url, api_key=key + "x", max_retries=0)
try:
    wrong.models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    check("a wrong key is a 401", True)
