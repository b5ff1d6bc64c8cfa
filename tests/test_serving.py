"""The OpenAI-compatible server (tools/serve.py's app) on the embedded demo model, driven over HTTP on
127.0.0.1 with the official ``openai`` client (raw HTTP for the malformed cases).

Every completion is checked against the model's own ``generate`` (contiguous KV cache, one prompt at
a time, the YAML's sampling defaults: greedy with repetition penalty 1.2): the server's paged cache,
scheduler, streaming, stop handling and detokenisation must give the same text.
"""
import concurrent.futures
import http.client
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from openai import APIStatusError, OpenAI

from mindformers_ext.generation.chat_templates import apply_chat_template
from mindformers_ext.generation.fim import build_fim_prompt, fim_stop_token_ids
from mindformers_ext.serving.loading import load_config_model, serve_app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "deepseek1_5", "predict_demo.yaml")
PROMPTS = ["def __init__(self", "import os\nimport sys\n\ndef main():", "class Stack:\n    def push(self, item):",
           "# read a file\ndef read(path):", "for i in range(10):", "def fib(n):", "x = [", "try:\n    import json",
           "def add(a, b):\n    return", "while True:", "if __name__ == '__main__':", "def test_sum():",
           "from collections import", "with open(path) as f:", "class Error(Exception):", "def parse(text):"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    cwd = os.getcwd()
    os.chdir(REPO)  # the demo YAML's checkpoint path is repository-relative
    try:
        model, tokenizer, name, family = load_config_model(DEMO)
    finally:
        os.chdir(cwd)
    app = serve_app(model, tokenizer, name, family, max_num_seqs=16, block_size=16)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)

    class Server:
        url = f"http://127.0.0.1:{port}"
        host = ("127.0.0.1", port)
        engine = app.state.served.engine

    Server.model, Server.tokenizer, Server.name, Server.family = model, tokenizer, name, family
    Server.client = OpenAI(base_url=f"{Server.url}/v1", api_key="none", max_retries=0, timeout=120)
    yield Server
    srv.should_exit = True
    thread.join(timeout=30)


def _http(server, method, path, body=None):
    """(status, content type, body text) of one plain HTTP request (``body``: JSON-able, or raw bytes)."""
    conn = http.client.HTTPConnection(*server.host, timeout=60)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"content-type": "application/json"} if data else {})
        res = conn.getresponse()
        return res.status, res.getheader("content-type"), res.read().decode()
    finally:
        conn.close()


def _reference(server, ids, max_new, stop_ids=()):
    """New ids of the model's own generate (contiguous cache, alone) with the YAML's defaults."""
    eos = [server.model.config.eos_token_id, *stop_ids]
    out = server.model.generate([ids], max_new_tokens=max_new, eos_token_id=eos)[0]
    return [int(t) for t in out[len(ids):]]


def _text(server, new_ids, stop_ids=()):
    ends = {server.model.config.eos_token_id, *stop_ids}
    finished = bool(new_ids) and new_ids[-1] in ends
    return server.tokenizer.decode(new_ids[:-1] if finished else new_ids, skip_special_tokens=True), finished


def _encode(server, text):
    return [int(t) for t in server.tokenizer(text, add_special_tokens=True)["input_ids"]]


def _wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = server.engine.stats()
        if not s["running"] and not s["waiting"] and s["free_blocks"] == s["num_blocks"]:
            return s
        time.sleep(0.05)
    raise AssertionError(f"the engine did not go idle: {server.engine.stats()}")


def test_models_health_and_metrics(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [server.name]
    status, _, body = _http(server, "GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    server.client.completions.create(model=server.name, prompt="def f(x):", max_tokens=3)
    text = _http(server, "GET", "/metrics")[2]
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    for key in ("mfx_queue_length", "mfx_running_requests", "mfx_generation_tokens_per_second",
                'mfx_time_to_first_token_seconds{quantile="0.5"}', "mfx_time_to_first_token_seconds_count"):
        assert key in values, key
    assert values["mfx_requests_total"] >= 1 and values["mfx_generated_tokens_total"] >= 3
    assert values['mfx_time_to_first_token_seconds{quantile="0.5"}'] > 0


def test_prefill_of_every_length_equals_generate(server):
    """Prompts of 1 to 64 tokens are prefilled in static graphs, padded to bucketed shapes (padding rows and
    left columns masked); longer ones in the dynamic-shape graph: the text equals ``generate`` either way."""
    body = "".join(PROMPTS)
    ids = _encode(server, body)
    for length in (1, 15, 16, 17, 64, 65, 100):
        prompt = server.tokenizer.decode(ids[1:length], skip_special_tokens=True)  # after the BOS
        assert len(_encode(server, prompt)) == length
        expected, _ = _text(server, _reference(server, _encode(server, prompt), 12))
        res = server.client.completions.create(model=server.name, prompt=prompt, max_tokens=12)
        assert res.choices[0].text == expected, length


def test_completion_equals_generate(server):
    ids = _encode(server, PROMPTS[1])
    expected, finished = _text(server, _reference(server, ids, 40))
    res = server.client.completions.create(model=server.name, prompt=PROMPTS[1], max_tokens=40)
    assert res.choices[0].text == expected
    assert res.choices[0].finish_reason == ("stop" if finished else "length")
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens <= 40
    echo = server.client.completions.create(model=server.name, prompt=PROMPTS[1], max_tokens=40, echo=True)
    assert echo.choices[0].text == PROMPTS[1] + expected


def test_prompts_given_as_token_ids(server):
    """OpenAI's "array of tokens" (one prompt) and "array of token arrays" (several): the same completions as
    generate of those ids; ids outside the vocabulary and fill-in-the-middle of ids are refused."""
    ids = [_encode(server, p) for p in PROMPTS[4:6]]
    expected = [_text(server, _reference(server, i, 10))[0] for i in ids]
    several = server.client.completions.create(model=server.name, prompt=ids, max_tokens=10)
    assert [c.text for c in several.choices] == expected
    one = server.client.completions.create(model=server.name, prompt=ids[1], max_tokens=10, echo=True)
    assert one.choices[0].text == PROMPTS[5] + expected[1] and one.usage.prompt_tokens == len(ids[1])
    vocab = server.model.config.vocab_size
    for body, param in (({"prompt": [5, vocab]}, "prompt"), ({"prompt": [[5], [-1]]}, "prompt"),
                        ({"prompt": ids[0], "suffix": "x"}, "suffix")):
        code, res = _post(server, {"model": server.name, "max_tokens": 2, **body})
        assert code == 400 and res["error"]["param"] == param, res


def test_stream_is_server_sent_events_ending_with_done(server):
    expected, _ = _text(server, _reference(server, _encode(server, PROMPTS[0]), 24))
    body = {"model": server.name, "prompt": PROMPTS[0], "max_tokens": 24, "stream": True}
    status, content_type, text = _http(server, "POST", "/v1/completions", body)
    assert status == 200 and content_type.startswith("text/event-stream")
    lines = [line for line in text.split("\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len(chunks) > 3  # streamed token by token, not in one piece
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_sixteen_concurrent_streams_each_equal_its_single_request_output(server):
    """16 streaming requests at once (64 new tokens each): none lost, each equals the model's generate
    on that prompt alone; the cache pool is whole again afterwards."""
    expected = [_text(server, _reference(server, _encode(server, p), 64))[0] for p in PROMPTS]

    def run(prompt):
        stream = server.client.completions.create(model=server.name, prompt=prompt, max_tokens=64, stream=True)
        return "".join(chunk.choices[0].text for chunk in stream)

    before = server.engine.stats()["finished"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, PROMPTS))
    assert got == expected
    stats = _wait_idle(server)
    assert stats["finished"] - before == 16


def test_requests_with_different_sampling_settings_share_steps_and_keep_their_own_output(server):
    """Greedy (with and without the YAML's repetition penalty) and seeded sampling requests (temperature,
    top-k, top-p) sent together decode in the same steps, where the engine chooses the tokens of the rows
    with equal settings in one call: each gives the text it gives alone, and the greedy one equals
    ``generate``."""
    settings = [{"temperature": 0}, {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}},
                {"temperature": 0.8, "seed": 1}, {"temperature": 0.8, "seed": 2},
                {"temperature": 1.3, "top_p": 0.9, "seed": 3}, {"temperature": 0.7, "seed": 4, "extra_body": {"top_k": 5}},
                {"temperature": 0.8, "seed": 1}, {"temperature": 0}]

    def run(i):
        return server.client.completions.create(model=server.name, prompt=PROMPTS[i], max_tokens=24,
                                                **settings[i]).choices[0].text

    alone = [run(i) for i in range(len(settings))]
    before = server.engine.stats()["steps"]
    with concurrent.futures.ThreadPoolExecutor(len(settings)) as pool:
        together = list(pool.map(run, range(len(settings))))
    assert together == alone
    assert server.engine.stats()["steps"] - before < 2 * 24  # they did share steps
    assert alone[0] == _text(server, _reference(server, _encode(server, PROMPTS[0]), 24))[0]


@pytest.mark.parametrize("name", ["deepseek-coder", "deepseek-llm", "wizardcoder"])
def test_incremental_detokenizer_equals_decoding_the_whole_list(name):
    """The engine's incremental detokenizer gives, after every new id, the text of the whole list (the
    real tokenizers; random ids, which split and break UTF-8 characters and hit special tokens; and the
    ids of text with multi-byte characters)."""
    from tokenizers import Tokenizer, decoders

    from mindformers_ext.serving.engine import IncrementalDetokenizer
    from mindformers_ext.tokenizers.paths import tokenizer_path

    backend = Tokenizer.from_file(os.path.join(tokenizer_path(name), "tokenizer.json"))
    assert isinstance(backend.decoder, decoders.ByteLevel)  # where the engine decodes incrementally

    def decode(ids):
        return backend.decode(ids, skip_special_tokens=True)
    rng = np.random.default_rng(0)
    text = "def 加法(a, b):  # 返回 a + b ✓ 🐍\n    return a + b\n"
    lists = [backend.encode(text).ids] + [rng.integers(0, backend.get_vocab_size(), 60).tolist() for _ in range(20)]
    for ids in lists:
        detokenize = IncrementalDetokenizer(decode)
        for n in range(1, len(ids) + 1):
            assert detokenize(ids[:n]) == decode(ids[:n]), (ids[:n], n)


def test_chat_completion_uses_the_family_template_and_stops_at_end_of_turn(server):
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    text = apply_chat_template(messages, server.tokenizer, family=server.family)
    ids = [int(t) for t in server.tokenizer(text, add_special_tokens=False)["input_ids"]]
    eot = server.tokenizer.convert_tokens_to_ids("<|EOT|>")
    expected, _ = _text(server, _reference(server, ids, 32, [eot]), [eot])
    res = server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=32)
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == expected
    assert res.usage.prompt_tokens == len(ids)
    stream = server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=32, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_chat_logprobs(server):
    """Chat's ``logprobs``: an entry per completion token, streamed or not, with the token's log-probability
    under the model (log-softmax of generate's raw logits), its UTF-8 bytes and ``top_logprobs``
    alternatives, most probable first."""
    messages = [{"role": "user", "content": "Print hello."}]
    ids = [int(t) for t in server.tokenizer(apply_chat_template(messages, server.tokenizer, family=server.family),
                                            add_special_tokens=False)["input_ids"]]
    first = _reference(server, ids, 1)[0]
    out = server.model.generate([ids], max_new_tokens=1, do_sample=False, repetition_penalty=1.0,
                                return_dict_in_generate=True, output_logits=True)
    raw = out.logits[0][0].astype(np.float64)
    log_softmax = raw - raw.max() - np.log(np.exp(raw - raw.max()).sum())
    kwargs = dict(model=server.name, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    res = server.client.chat.completions.create(**kwargs)
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens
    assert content[0].token == server.tokenizer.decode([first])
    assert content[0].logprob == pytest.approx(log_softmax[first], abs=1e-4)
    assert bytes(content[0].bytes).decode() == content[0].token
    top = [t.logprob for t in content[0].top_logprobs]
    assert len(top) == 3 and top == sorted(top, reverse=True) and top[0] == pytest.approx(log_softmax.max(), abs=1e-4)
    streamed = [entry for chunk in server.client.chat.completions.create(stream=True, **kwargs)
                for entry in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else [])]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=2
                                                 ).choices[0].logprobs is None
    code, err = _post(server, {"model": server.name, "messages": messages, "top_logprobs": 2}, "/v1/chat/completions")
    assert code == 400 and err["error"]["param"] == "top_logprobs", err


def test_fill_in_the_middle_with_suffix(server):
    prefix, suffix = "def area(r):\n    ", "\n    return result\n"
    ids = _encode(server, build_fim_prompt(prefix, suffix, server.family))
    stops = fim_stop_token_ids(server.tokenizer, server.family)
    expected, _ = _text(server, _reference(server, ids, 24, stops), stops)
    res = server.client.completions.create(model=server.name, prompt=prefix, suffix=suffix, max_tokens=24)
    assert res.choices[0].text == expected
    assert res.usage.prompt_tokens == len(ids)


def test_stop_strings_cut_the_text_and_never_leak_into_the_stream(server):
    ids = _encode(server, PROMPTS[5])
    full, _ = _text(server, _reference(server, ids, 48))
    words = [w for w in full.split() if len(w) >= 3]
    assert words, full
    stop = words[len(words) // 2][:3]  # a 3-character stop string from the middle of the reference text
    expected = full[:full.find(stop)]
    res = server.client.completions.create(model=server.name, prompt=PROMPTS[5], max_tokens=48, stop=[stop])
    assert res.choices[0].text == expected and res.choices[0].finish_reason == "stop"
    streamed = [c.choices[0].text for c in server.client.completions.create(
        model=server.name, prompt=PROMPTS[5], max_tokens=48, stop=stop, stream=True)]
    assert "".join(streamed) == expected


def test_seeded_sampling_is_reproducible_and_logprobs_are_log_probabilities(server):
    kwargs = dict(model=server.name, prompt=PROMPTS[3], max_tokens=16, temperature=0.9, top_p=0.95)
    a = server.client.completions.create(seed=7, **kwargs).choices[0].text
    b = server.client.completions.create(seed=7, **kwargs).choices[0].text
    others = {server.client.completions.create(seed=s, **kwargs).choices[0].text for s in range(8, 12)}
    assert a == b
    assert len(others | {a}) > 1  # different seeds do not all give the same text
    res = server.client.completions.create(model=server.name, prompt=PROMPTS[3], max_tokens=4, logprobs=3,
                                           temperature=0)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 3
        assert value == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the chosen token is the top one
    # the reported log-probabilities are the model's: log-softmax of generate's raw logits
    ids = _encode(server, PROMPTS[3])
    out = server.model.generate([ids], max_new_tokens=1, do_sample=False, repetition_penalty=1.0,
                                return_dict_in_generate=True, output_logits=True)
    logits = out.logits[0][0].astype(np.float64)
    log_softmax = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert lp.token_logprobs[0] == pytest.approx(log_softmax.max(), abs=1e-4)


def test_presence_and_frequency_penalties_follow_openai_formula(server):
    """Greedy with OpenAI's penalties: each token is the argmax of the model's raw logits after the YAML's
    repetition penalty (HF's rule, over prompt and output) and ``logit -= frequency * count + presence *
    (count > 0)`` over the tokens generated so far, written out here step by step."""
    ids = _encode(server, PROMPTS[9])
    penalty = server.model.config.repetition_penalty

    def reference(presence, frequency, steps=12):
        new = []
        for _ in range(steps):
            out = server.model.generate([ids + new], max_new_tokens=1, do_sample=False, repetition_penalty=1.0,
                                        eos_token_id=[], return_dict_in_generate=True, output_logits=True)
            logits = out.logits[0][0].astype(np.float64)
            for token in set(ids + new):
                logits[token] = logits[token] * penalty if logits[token] < 0 else logits[token] / penalty
            for token in set(new):
                logits[token] -= frequency * new.count(token) + presence
            new.append(int(np.argmax(logits)))
        return new

    baseline = reference(0.0, 0.0)
    for presence, frequency in ((0.7, 1.3), (-1.5, -2.0)):  # negative values favour repeating a token
        expected = reference(presence, frequency)
        res = server.client.completions.create(model=server.name, prompt=PROMPTS[9], max_tokens=12, temperature=0,
                                               presence_penalty=presence, frequency_penalty=frequency,
                                               extra_body={"ignore_eos": True})
        assert res.choices[0].text == server.tokenizer.decode(expected, skip_special_tokens=True)
    assert expected != baseline  # the penalties changed that completion
    for field in ("presence_penalty", "frequency_penalty"):
        code, err = _post(server, {"model": server.name, "prompt": "x", field: 2.5})
        assert code == 400 and err["error"]["param"] == field, err


def test_logit_bias(server):
    """A bias of 100 on one token makes greedy decoding choose it every time (even after the repetition
    penalty divides it); -100 on the model's greedy first token makes the first token its runner-up."""
    ids = _encode(server, PROMPTS[6])
    out = server.model.generate([ids], max_new_tokens=1, do_sample=False, repetition_penalty=1.0,
                                return_dict_in_generate=True, output_logits=True)
    logits = out.logits[0][0].astype(np.float64)
    for token in set(ids):  # the YAML's repetition penalty, HF's rule
        penalty = server.model.config.repetition_penalty
        logits[token] = logits[token] * penalty if logits[token] < 0 else logits[token] / penalty
    first, runner_up = np.argsort(-logits)[:2]
    forced = int(np.argsort(-logits)[50])
    res = server.client.completions.create(model=server.name, prompt=PROMPTS[6], max_tokens=4, temperature=0,
                                           logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert res.choices[0].text == server.tokenizer.decode([forced] * 4, skip_special_tokens=True)
    res = server.client.completions.create(model=server.name, prompt=PROMPTS[6], max_tokens=1, temperature=0,
                                           logit_bias={str(first): -100}, logprobs=0)
    assert res.choices[0].logprobs.tokens == [server.tokenizer.decode([int(runner_up)])]
    vocab = server.model.config.vocab_size
    for bias in ({str(vocab): 1}, {"x": 1}, {"5": 101}):
        code, err = _post(server, {"model": server.name, "prompt": "x", "logit_bias": bias})
        assert code == 400 and err["error"]["param"] == "logit_bias", err


def _post(server, body, path="/v1/completions"):
    status, _, text = _http(server, "POST", path, body)
    return status, json.loads(text)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "MODEL", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "MODEL", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "MODEL", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "MODEL", "prompt": "def f():\n" * 300, "max_tokens": 4}, 400, "prompt"),
    ({"model": "MODEL", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "MODEL", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "MODEL", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "MODEL", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "MODEL", "prompt": 5}, 400, "prompt"),
    ({"model": "MODEL", "prompt": "x", "best_of": 2}, 400, "best_of"),
    ({"model": "MODEL", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "MODEL", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (b'{"model": "MODEL", "prompt": "x"', 400, None),
    (b"not json", 400, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    if isinstance(body, dict):
        body = {k: (server.name if v == "MODEL" else v) for k, v in body.items()}
    else:
        body = body.replace(b"MODEL", server.name.encode())
    code, res = _post(server, body)
    assert code == status, res
    error = res["error"]
    assert error["param"] == param and error["message"] and error["type"]
    if param:
        assert param in error["message"]
    assert server.client.completions.create(model=server.name, prompt="x = 1", max_tokens=2).choices


def test_chat_bad_messages(server):
    code, res = _post(server, {"model": server.name, "messages": [{"role": "robot", "content": "hi"}]},
                      "/v1/chat/completions")
    assert code == 400 and res["error"]["param"].startswith("messages.0.role"), res
    code, res = _post(server, {"model": server.name, "messages": []}, "/v1/chat/completions")
    assert code == 400 and res["error"]["param"] == "messages", res


def test_client_going_away_mid_stream_cancels_its_request(server):
    before = server.engine.stats()["cancelled"]
    body = {"model": server.name, "prompt": PROMPTS[2], "max_tokens": 200, "stream": True}
    conn = http.client.HTTPConnection(*server.host, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers={"content-type": "application/json"})
    res = conn.getresponse()
    assert res.status == 200 and res.read(6) == b"data: "  # (read() undoes the chunked transfer encoding)
    conn.close()
    # the connection is closed after one chunk: the engine stops the request and frees its blocks
    deadline = time.time() + 30
    while server.engine.stats()["cancelled"] == before:
        assert time.time() < deadline, server.engine.stats()
        time.sleep(0.05)
    _wait_idle(server)
    assert server.client.completions.create(model=server.name, prompt="y = 2", max_tokens=2).choices


def test_full_queue_answers_503(server):
    engine = server.engine
    saved = engine.max_queue
    engine.max_queue = 0  # every new request finds the queue full
    try:
        code, res = _post(server, {"model": server.name, "prompt": "x", "max_tokens": 2})
    finally:
        engine.max_queue = saved
    assert code == 503 and res["error"]["code"] == "queue_full", res
    with pytest.raises(APIStatusError):
        engine.max_queue = 0
        try:
            server.client.completions.create(model=server.name, prompt="x", max_tokens=2)
        finally:
            engine.max_queue = saved
    assert server.client.completions.create(model=server.name, prompt="x", max_tokens=2).choices


def test_many_requests_leave_no_blocks_behind(server):
    """200 short requests, 16 at a time: every one answered, and the pool is whole again."""
    def run(i):
        return server.client.completions.create(model=server.name, prompt=PROMPTS[i % 16], max_tokens=3).choices[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        choices = list(pool.map(run, range(200)))
    assert len(choices) == 200 and all(c.finish_reason in ("stop", "length") for c in choices)
    _wait_idle(server)


@pytest.mark.slow
def test_serve_cli_on_an_hf_directory_with_int8_weights_and_cache(tmp_path):
    """``tools/serve.py --model HF_DIR --quant w8a16 --kv_cache_dtype int8 --dynamic_decode --dynamic_prefill``
    as a user starts it (the one dynamic-shape decode and prefill graphs; the other tests serve with the
    default buckets): its
    text and per-token log-probabilities equal generate of ``load_hf_model(HF_DIR, quant="w8a16",
    kv_cache_dtype="int8")`` in this process, and differ from the float model's (the options apply)."""
    import shutil
    import subprocess
    import sys

    from conftest import make_tiny_llama
    from mindformers_ext import load_hf_model
    from research.deepseek1_5 import DeepSeekCoderTokenizer

    hf_dir = str(tmp_path / "hf")
    make_tiny_llama(hf_dir, vocab_size=102400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    max_position_embeddings=256, bos_token_id=100000, eos_token_id=100001, pad_token_id=100001)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(REPO, "mindformers_ext", "tokenizers", "data", "deepseek-llm", name), hf_dir)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "serve.py"), "--model", hf_dir, "--quant",
                             "w8a16", "--kv_cache_dtype", "int8", "--dynamic_decode", "--dynamic_prefill", "--port", str(port),
                             "--log_level", "warning"],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        tokenizer = DeepSeekCoderTokenizer(tokenizer_file=hf_dir)
        ids = [int(t) for t in tokenizer("def fib(n):", add_special_tokens=True)["input_ids"]]

        def reference(model):
            out = model.generate([ids], max_new_tokens=12, eos_token_id=[], return_dict_in_generate=True,
                                 output_logits=True)
            new = [int(t) for t in out.sequences[0][len(ids):]]
            logits = np.stack(out.logits)[:, 0].astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            return new, np.array([logprobs[i, t] for i, t in enumerate(new)])

        new, expected_lp = reference(load_hf_model(hf_dir, quant="w8a16", kv_cache_dtype="int8"))
        _, float_lp = reference(load_hf_model(hf_dir))
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.time() + 180
        while True:
            try:
                models = client.models.list()
                break
            except Exception:  # pylint: disable=broad-except  # not listening yet
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "tools/serve.py did not start"
                time.sleep(0.5)
        assert [m.id for m in models.data] == ["hf"]
        res = client.completions.create(model="hf", prompt="def fib(n):", max_tokens=12, logprobs=0,
                                        extra_body={"ignore_eos": True})
        assert res.choices[0].text == tokenizer.decode(new, skip_special_tokens=True)
        served_lp = np.array(res.choices[0].logprobs.token_logprobs)
        assert np.abs(served_lp - expected_lp).max() <= 1e-4
        assert np.abs(float_lp - expected_lp).max() > 1e-3  # int8 weights and cache do change the numbers
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_compile_cache_path_follows_the_configuration_settings_and_sources(server, tmp_path, monkeypatch):
    """``tools/serve.py --compile_cache DIR`` keeps MindSpore's compile cache in one subdirectory per model
    configuration, engine settings and source tree: MindSpore's own key misses configuration constants
    (the demo with another ``rms_norm_eps`` ran the cached graph), so each of these must change the path."""
    import importlib
    import sys

    from mindformers_ext.serving import loading

    path = loading.compile_cache_path(str(tmp_path), server.model, max_num_seqs=16)
    assert os.path.dirname(path) == str(tmp_path)
    assert loading.compile_cache_path(str(tmp_path), server.model, max_num_seqs=16) == path
    assert loading.compile_cache_path(str(tmp_path), server.model, max_num_seqs=8) != path
    eps = server.model.config.rms_norm_eps
    monkeypatch.setattr(server.model.config, "rms_norm_eps", eps * 2)
    assert loading.compile_cache_path(str(tmp_path), server.model, max_num_seqs=16) != path
    monkeypatch.setattr(server.model.config, "rms_norm_eps", eps)

    package = tmp_path / "src" / "mfx_digest_probe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    importlib.invalidate_caches()
    before = loading._source_digest(("mfx_digest_probe",))  # pylint: disable=protected-access
    (package / "__init__.py").write_text("X = 2\n")
    loading._source_digest.cache_clear()  # pylint: disable=protected-access
    assert loading._source_digest(("mfx_digest_probe",)) != before  # pylint: disable=protected-access
    sys.modules.pop("mfx_digest_probe", None)


@pytest.mark.slow
def test_serve_cli_compile_cache_is_reused_on_the_next_start(tmp_path):
    """``tools/serve.py --compile_cache DIR`` started twice: the first start compiles its seventeen graphs (the
    dynamic-shape prefill, six static prefill and ten decode shapes) and fills DIR; the second takes every one of them from DIR (MindSpore
    logs "Use the compilation cache" for each at warning level) and serves the same completion."""
    import subprocess
    import sys

    def start() -> tuple:
        port = _free_port()
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "serve.py"), "--port", str(port),
                                 "--compile_cache", str(tmp_path / "cache"), "--log_level", "warning"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "GLOG_v": "2"})
        lines = []
        try:
            for line in proc.stdout:  # the warm-up log, up to "serving ..."
                lines.append(line)
                if line.startswith("serving "):
                    break
            assert proc.poll() is None, "".join(lines)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=3, timeout=60)
            text = client.completions.create(model="deepseek_coder_demo", prompt="def fib(n):", max_tokens=12,
                                             temperature=0).choices[0].text
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        log = "".join(lines)
        assert "compiled prefill graph 6/6" in log and "compiled decode graph 10/10" in log, log
        return text, log.count("Use the compilation cache"), log

    first_text, first_hits, log = start()
    assert "compile cache: " + str(tmp_path / "cache") in log
    assert first_hits == 0
    assert any(files for _, _, files in os.walk(tmp_path / "cache")), "the first start cached nothing"
    second_text, second_hits, _ = start()
    assert second_hits == 17
    assert second_text == first_text
