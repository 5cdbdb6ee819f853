"""The OpenAI-compatible server: the official `openai` client against a tiny model, errors, disconnects, the CLI."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")

from lmforge.convert import load_with_tokenizer  # noqa: E402
from lmforge.infer.config import GenerationConfig  # noqa: E402
from lmforge.infer.generate import generate  # noqa: E402
from lmforge.serve.config import ServeConfig  # noqa: E402
from lmforge.serve.server import make_server  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(cfg: ServeConfig) -> Iterator[tuple[Any, str]]:
    """make_server(cfg) running in a thread on a free port: (the uvicorn server, its base URL); stopped after."""
    cfg.port = free_port()
    srv = make_server(cfg)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield srv, f"http://127.0.0.1:{cfg.port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(base):
    with running(ServeConfig(model=[str(base)], name=["tiny"], max_tokens_limit=64)) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused")


def test_models_completions_and_chat_equal_lmforge_generate(server, client, base):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    model, tokenizer = load_with_tokenizer(base)
    model.eval()
    want = generate(model, ["the cat"], GenerationConfig(max_new_tokens=8, temperature=0.0), tokenizer)[0]
    got = client.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
    messages = [{"role": "user", "content": "the cat"}]
    ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    want = generate(model, [ids], GenerationConfig(max_new_tokens=10, temperature=0.0), tokenizer,
                    eos_id=tokenizer.chat_stop_ids)[0]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == want.text and reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")


def test_streaming_gives_the_same_text_and_n_samples_are_seeded(client):
    messages = [{"role": "user", "content": "a dog is"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    pieces, finish = [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    text = "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt="the", max_tokens=6,
                                                                          temperature=0, stream=True))
    assert text == client.completions.create(model="tiny", prompt="the", max_tokens=6, temperature=0).choices[0].text
    first = client.completions.create(model="tiny", prompt="the", max_tokens=6, n=3, seed=5, temperature=1.0)
    again = client.completions.create(model="tiny", prompt="the", max_tokens=6, n=3, seed=5, temperature=1.0)
    assert [c.text for c in first.choices] == [c.text for c in again.choices] and len(first.choices) == 3


def test_errors_have_openai_shape_and_status(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1000)  # above max_tokens_limit
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="the " * 200)  # longer than the context
    url = server[1]
    for body in ('{"model": "tiny", "prompt": ', '{"model": "tiny", "prompt": "x", "bogus": 1}',
                 '{"model": "tiny", "prompt": "x", "temperature": -1}', '{"model": "tiny", "prompt": "x", "n": "two"}',
                 '[1, 2]'):
        response = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"] and "Traceback" not in response.text
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(server):
    url = server[1]
    engine = next(iter(server[0].config.app.state.models.values())).engine
    with httpx.stream("POST", url + "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 60,
                                                            "temperature": 0.0, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then the client goes away
    deadline = time.time() + 20
    while time.time() < deadline and (engine.stats()["kv_blocks_used"] or engine.engine.requests):
        time.sleep(0.05)
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.engine.requests


@pytest.mark.slow
def test_cli_serve_answers_and_stops_on_sigterm(base, tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(base), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": base.name, "prompt": "the cat", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body).json()
        assert answer["object"] == "text_completion" and answer["choices"][0]["finish_reason"] in ("stop", "length")
        assert json.dumps(answer)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


@pytest.mark.slow
def test_lm_evaluation_harness_scores_choices_through_the_server(server, base, tmp_path, monkeypatch):
    """lm-evaluation-harness's local-completions model with the remote tokenizer (/tokenizer_info, /tokenize):
    every choice's log-likelihood it gets back equals the model's own, computed here with a forward pass."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a dev dependency")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"question": "the cat sat on the", "choices": ["mat", "dog", "friend"], "label": 0},
            {"question": "a dog is a", "choices": ["friend", "cat", "mat"], "label": 0},
            {"question": "the dog sat", "choices": ["on the mat", "a friend"], "label": 1}]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy.yaml").write_text(
        "task: lmforge_toy_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'toy.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n")
    args = (f"base_url={server[1]}/v1/completions,model=tiny,tokenizer_backend=remote,tokenized_requests=True,"
            "num_concurrent=1,max_retries=1")
    results = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["lmforge_toy_choice"],
                                      task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    model, tokenizer = load_with_tokenizer(base)
    model.eval()
    import torch

    hits = []
    for sample in results["samples"]["lmforge_toy_choice"]:
        doc = sample["doc"]
        context = tokenizer.encode(doc["question"])
        scores = []
        for choice, (got, _) in zip(doc["choices"], [r[0] for r in sample["resps"]]):
            whole = tokenizer.encode(doc["question"] + " " + choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole]))[0], dim=-1)
            want = sum(float(logp[p - 1, whole[p]]) for p in range(len(context), len(whole)))
            assert got == pytest.approx(want, abs=1e-4)
            scores.append(want)
        hits.append(scores.index(max(scores)) == doc["label"])
    assert results["results"]["lmforge_toy_choice"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_logprobs_echo_and_tokenizer_endpoints(server, client, base):
    import torch

    url = server[1]
    model, tokenizer = load_with_tokenizer(base)
    model.eval()
    ids = httpx.post(url + "/tokenize", json={"prompt": "the cat sat"}).json()["tokens"]
    assert ids == tokenizer.encode("the cat sat")
    assert httpx.post(url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "the cat sat"
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.special_tokens["eos"] and info["model_max_length"] == 64
    assert httpx.post(url + "/detokenize", json={"tokens": [10**6]}).status_code == 400
    # echo + logprobs + one new token: what lm-evaluation-harness asks for a log-likelihood
    out = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=1, temperature=0, echo=True,
                                    logprobs=2)
    choice = out.choices[0]
    assert choice.text.startswith("the cat sat") and len(choice.logprobs.tokens) == len(ids) + 1
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    want = [float(logp[p - 1, ids[p]]) for p in range(1, len(ids))] + [float(logp[-1].max())]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy: the most likely


def test_embeddings_and_metrics(server, client, base):
    import torch

    out = client.embeddings.create(model="tiny", input=["the cat", "a dog is a friend"])
    model, tokenizer = load_with_tokenizer(base)
    with torch.no_grad():
        want = model.hidden_states(torch.tensor([tokenizer.encode("the cat")]))[0].mean(dim=0)
    want = torch.nn.functional.normalize(want, dim=0)
    assert len(out.data) == 2 and out.data[0].embedding == pytest.approx(want.tolist(), abs=1e-5)
    text = httpx.get(server[1] + "/metrics").text
    for name in ("lmforge_requests_total", "lmforge_request_seconds_bucket", "lmforge_kv_cache_usage",
                 "lmforge_queue_depth", "lmforge_generation_tokens_total", "lmforge_prefix_cache_hit_rate"):
        assert name in text
    assert 'path="/v1/embeddings",status="200"' in text


def test_api_keys_rate_limit_and_request_size(base, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# one key a line\nsecret-b\n")
    port = free_port()
    srv = make_server(ServeConfig(model=[str(base)], name=["tiny"], port=port, api_key=["secret-a"],
                                  api_keys_file=str(keys), rate_limit=3, max_request_bytes=2000))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        body = {"model": "tiny", "prompt": "the", "max_tokens": 2}
        denied = httpx.post(url + "/v1/completions", json=body)
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert httpx.post(url + "/v1/completions", json=body, headers={"authorization": "Bearer wrong"}
                          ).status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # open
        ok = openai.OpenAI(base_url=url + "/v1", api_key="secret-b")
        assert ok.completions.create(**body).choices
        for _ in range(2):
            ok.completions.create(**body)
        with pytest.raises(openai.RateLimitError):  # a 4th request within the minute
            openai.OpenAI(base_url=url + "/v1", api_key="secret-b", max_retries=0).completions.create(**body)
        other = openai.OpenAI(base_url=url + "/v1", api_key="secret-a", max_retries=0)
        assert other.completions.create(**body).choices  # the limit is per key
        big = httpx.post(url + "/v1/completions", json={**body, "prompt": "the " * 1000},
                         headers={"authorization": "Bearer secret-a"})
        assert big.status_code == 413 and "at most 2000" in big.json()["error"]["message"]
        assert "access-control-allow-origin" not in httpx.options(
            url + "/v1/completions", headers={"origin": "http://x", "access-control-request-method": "POST"}).headers
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_lora_adapters_are_served_by_name_beside_their_base(base, tmp_path):
    """An adapter dir is served under its own name: its replies are the adapted model's, the base's stay the
    base's; a prefix-tuning adapter (not run by the engine) is a one-line error."""
    from lmforge.convert import load
    from lmforge.errors import ConfigError
    from lmforge.peft.config import PeftConfig
    from lmforge.peft.files import save_adapter, wrap_base

    import torch

    for method in ("lora", "prefix"):
        peft = wrap_base(load(base), PeftConfig(method=method, targets=["q", "v"], virtual_tokens=4), str(base))
        with torch.no_grad():
            for param in peft.trainable_parameters().values():
                param.add_(torch.randn_like(param) * 0.5)
        save_adapter(peft, tmp_path / method)
        for name in ("tokenizer.json", "lmforge_tokenizer.json"):
            if (base / name).is_file():
                (tmp_path / method / name).write_bytes((base / name).read_bytes())
    with pytest.raises(ConfigError, match="prefix"):
        make_server(ServeConfig(model=[str(base), str(tmp_path / "prefix")], name=["base", "p"], port=free_port()))
    with running(ServeConfig(model=[str(base), str(tmp_path / "lora")], name=["base", "support-bot"])) as (_, url):
        lora = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        assert sorted(m.id for m in lora.models.list().data) == ["base", "support-bot"]
        for name, directory in (("base", base), ("support-bot", tmp_path / "lora")):
            model, tokenizer = load_with_tokenizer(directory)
            want = generate(model.eval(), ["the cat"], GenerationConfig(max_new_tokens=8, temperature=0.0),
                            tokenizer)[0]
            got = lora.completions.create(model=name, prompt="the cat", max_tokens=8, temperature=0)
            assert got.choices[0].text == want.text, name
            if name == "base":
                base_text = want.text
        assert want.text != base_text  # the adapter changes the replies
