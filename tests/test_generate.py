"""Generation: cache == no cache, parity with Hugging Face greedy, left padding, seeds, stops, eos, streaming."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, PromptTooLongError
from lmforge.infer.generate import GenerationConfig, generate, stream_generate
from lmforge.model import ModelConfig, Transformer

VOCAB = 260
GREEDY = dict(temperature=0.0, eos=False)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus specials: decode of a cut multi-byte character gives U+FFFD."""

    eos_id, pad_id, bos_id, vocab_size = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ScriptedModel(torch.nn.Module):
    """Predicts scripts[b][p + 1] at position p: row b 'continues' a fixed token sequence, cached or not."""

    def __init__(self, scripts: list[list[int]], block_size: int = 64) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=VOCAB, block_size=block_size, n_layer=1, n_head=1, d_model=8)
        self.scripts = torch.tensor([s + [0] * (block_size + 1 - len(s)) for s in scripts])
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.lm_head = torch.nn.Identity()

    def new_kv_cache(self, batch_size: int, max_len: int) -> SimpleNamespace:
        return SimpleNamespace(length=0)

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, kv_cache=None):
        if kv_cache is not None:
            kv_cache.length += input_ids.shape[1]
        return F.one_hot(self.scripts.gather(1, position_ids + 1), VOCAB).float()


def scripted(texts: list[str], tok: ByteTokenizer, eos_after: dict[int, int] | None = None) -> ScriptedModel:
    scripts = [tok.encode(t) for t in texts]
    for row, at in (eos_after or {}).items():
        scripts[row].insert(at, tok.eos_id)
    return ScriptedModel(scripts)


def tiny(style: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(f"tiny-{style}", vocab_size=VOCAB, block_size=64, d_model=32, init_std=0.1, **overrides)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny(request.param)  # tiny-llama has n_kv_head=2 of 4 heads (GQA)


def test_greedy_with_cache_equals_without(model):
    prompts = [[5, 6, 7, 8, 9], [1, 2], [30, 40, 50]]
    cfg = GenerationConfig(max_new_tokens=12, **GREEDY)
    cached = generate(model, prompts, cfg)
    uncached = generate(model, prompts, GenerationConfig(max_new_tokens=12, use_cache=False, **GREEDY))
    assert [c.token_ids for c in cached] == [c.token_ids for c in uncached]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in cached)


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [[11, 12, 13, 14, 15, 16, 17], [3], [200, 100, 50]]
    cfg = GenerationConfig(max_new_tokens=10, **GREEDY)
    batched = [c.token_ids for c in generate(model, prompts, cfg)]
    alone = [generate(model, [p], cfg)[0].token_ids for p in prompts]
    assert batched == alone


def test_tensor_prompts_equal_list_prompts(model):
    cfg = GenerationConfig(max_new_tokens=6, **GREEDY)
    from_tensor = generate(model, torch.tensor([[4, 5, 6], [7, 8, 9]]), cfg)
    from_lists = generate(model, [[4, 5, 6], [7, 8, 9]], cfg)
    assert [c.token_ids for c in from_tensor] == [c.token_ids for c in from_lists]


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    prompts = [[1, 2, 3], [9, 8]]
    sampled = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7, eos=False)
    first = [c.token_ids for c in generate(model, prompts, sampled)]
    assert first == [c.token_ids for c in generate(model, prompts, sampled)]
    other = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=8, eos=False)
    assert first != [c.token_ids for c in generate(model, prompts, other)]
    top1 = GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=1, seed=3, eos=False)
    greedy = GenerationConfig(max_new_tokens=10, **GREEDY)
    assert [c.token_ids for c in generate(model, prompts, top1)] == \
        [c.token_ids for c in generate(model, prompts, greedy)]


def test_eos_ends_a_row_and_others_continue(model):
    prompts = [[1, 2, 3], [40, 41], [7]]
    reference = [c.token_ids for c in generate(model, prompts, GenerationConfig(max_new_tokens=8, **GREEDY))]
    eos_id = reference[0][2]
    out = generate(model, prompts, GenerationConfig(max_new_tokens=8, temperature=0.0), eos_id=eos_id)
    for ref, completion in zip(reference, out):
        if eos_id in ref:
            assert completion.token_ids == ref[:ref.index(eos_id) + 1] and completion.finish_reason == "eos"
        else:
            assert completion.token_ids == ref and completion.finish_reason == "length"
    assert out[0].token_ids[-1] == eos_id and len(out[0].token_ids) <= 3


def test_model_generate_takes_transformers_keyword_arguments(model):
    prompts = [[5, 6, 7], [9, 1]]
    reference = generate(model, prompts, GenerationConfig(max_new_tokens=6, temperature=0))
    for kwargs in ({"max_new_tokens": 6, "do_sample": False}, {"max_new_tokens": 6, "temperature": 0.0}):
        assert [c.token_ids for c in model.generate(input_ids=prompts, **kwargs)] == \
            [c.token_ids for c in reference]
    sampled = model.generate(prompts, max_new_tokens=6, do_sample=True, top_p=0.9, seed=3)
    assert [c.token_ids for c in sampled] == [c.token_ids for c in model.generate(
        prompts, GenerationConfig(max_new_tokens=6, top_p=0.9, seed=3))]
    with pytest.raises(ConfigError, match="unknown keyword argument.*num_beams"):
        model.generate(prompts, num_beams=4)


def test_several_stop_ids_end_a_row(model):
    free = generate(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=8, temperature=0))[0].token_ids
    first, third = free[0], free[2]
    for stop in ([third, first], (first,)):
        cut = model.generate([[5, 6, 7]], max_new_tokens=8, do_sample=False, eos_token_id=stop)[0]
        assert cut.finish_reason == "eos" and cut.token_ids == free[:1]
    later = generate(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=8, temperature=0), eos_id=[third])[0]
    assert later.token_ids == free[:free.index(third) + 1]


def test_repetition_penalty_avoids_seen_tokens_but_not_padding(model):
    prompt = [10, 20, 30, 40]
    cfg = GenerationConfig(max_new_tokens=15, repetition_penalty=1e6, **GREEDY)
    padded = generate(model, [[0, 0, 0] + prompt, prompt], cfg)[1].token_ids  # row 1 is left-padded with id 0
    assert padded == generate(model, [prompt], cfg)[0].token_ids
    assert len(set(padded)) == len(padded) and not set(padded) & set(prompt)


def test_eos_text_and_finish_reasons_on_a_scripted_batch():
    tok = ByteTokenizer()
    model = scripted(["ab:hello world", "xyz:more text here"], tok, eos_after={0: 8})  # row 0: "hello" then eos
    out = generate(model, ["ab:", "xyz:"], GenerationConfig(max_new_tokens=10, temperature=0.0), tok)
    assert (out[0].text, out[0].finish_reason, out[0].token_ids[-1]) == ("hello", "eos", tok.eos_id)
    assert (out[1].text, out[1].finish_reason, len(out[1].token_ids)) == ("more text ", "length", 10)


def test_stop_strings_cut_the_text():
    tok = ByteTokenizer()
    model = scripted(["Q: hi there. A: fine\n\nQ: next", "Q: héllo wörld END extra"], tok)
    cfg = GenerationConfig(max_new_tokens=30, temperature=0.0, stop=["\n\n", "END"])
    out = generate(model, ["Q:", "Q:"], cfg, tok)
    assert (out[0].text, out[0].finish_reason) == (" hi there. A: fine", "stop")
    assert (out[1].text, out[1].finish_reason) == (" héllo wörld ", "stop")
    assert tok.decode(out[1].token_ids) == " héllo wörld END"  # the tokens run up to the end of the stop


def test_stream_holds_back_partial_utf8_and_stop_prefixes():
    tok = ByteTokenizer()
    model = scripted(["> añ€ ENxy 😀 END tail"], tok)
    cfg = GenerationConfig(max_new_tokens=40, temperature=0.0, stop=["END"])
    deltas = list(stream_generate(model, tok, ">", cfg))
    assert "".join(deltas) == " añ€ ENxy 😀 " == generate(model, [">"], cfg, tok)[0].text
    assert not any("\ufffd" in d for d in deltas)
    assert not any(d.endswith("EN") or d.endswith("E") for d in deltas)  # a possible "END" waits


@pytest.mark.parametrize("stop", [[], ["b", "\r"]])
def test_stream_concatenation_equals_generate_text(stop):
    tok, model = ByteTokenizer(), tiny("llama", seed=1)
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.5, seed=5, stop=stop)
    streamed = "".join(stream_generate(model, tok, "The", cfg))
    assert streamed == generate(model, ["The"], cfg, tok)[0].text


def test_prompt_longer_than_context_raises_and_long_requests_are_clamped():
    model = tiny("gpt2")  # block_size 64
    with pytest.raises(PromptTooLongError, match="70.*64"):
        generate(model, [list(range(70))], GenerationConfig(max_new_tokens=5))
    with pytest.raises(PromptTooLongError, match="64.*64"):
        generate(model, [list(range(64))], GenerationConfig(max_new_tokens=5))
    out = generate(model, [list(range(60))], GenerationConfig(max_new_tokens=50, **GREEDY))
    assert len(out[0].token_ids) == 4 and out[0].finish_reason == "length"


def _hf_greedy(hf_model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_matches_transformers_generate(family):
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import from_hf_model

    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, initializer_range=0.1)
        hf_model = transformers.LlamaForCausalLM(config).eval()
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         initializer_range=0.1)
        hf_model = transformers.GPT2LMHeadModel(config).eval()
    model = from_hf_model(hf_model).eval()
    prompts = [[5, 17, 99, 3, 250], [42, 7]]
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=12, **GREEDY))
    assert [c.token_ids for c in ours] == [_hf_greedy(hf_model, p, 12) for p in prompts]


def test_run_generate_prints_each_prompt_with_its_continuation_and_ending(model_dir, capsys):
    from lmforge import load
    from lmforge.infer.generate import GenerateConfig, run_generate
    from lmforge.tokenizer import Tokenizer

    prompts = ["the cat", "a dog is"]
    cfg = GenerateConfig(model=str(model_dir), prompt=prompts, max_new_tokens=6, temperature=0.0, device="cpu")
    texts = run_generate(cfg)
    completions = generate(load(model_dir), prompts, cfg, Tokenizer.load(model_dir))
    assert texts == [c.text for c in completions]
    assert capsys.readouterr().out == "".join(
        f"=== {row + 1}/2 ===\n{prompt}{c.text}\n[{c.finish_reason}, {len(c.token_ids)} tokens]\n"
        for row, (prompt, c) in enumerate(zip(prompts, completions)))
    streamed = run_generate(GenerateConfig(model=str(model_dir), prompt=prompts[:1], max_new_tokens=6,
                                           temperature=0.0, stream=True, device="cpu"))
    c = completions[0]
    assert streamed == texts[:1]  # one prompt: no header line
    assert capsys.readouterr().out == f"the cat{c.text}\n[{c.finish_reason}, {len(c.token_ids)} tokens]\n"


def test_cli_streams_several_prompts_one_after_another(model_dir, capsys, monkeypatch):
    import sys

    from lmforge.cli import main

    args = ["generate", "--model", str(model_dir), "--prompt", "the cat", "--prompt", "a dog is", "--prompt", "héllo",
            "--max_new_tokens", "8", "--temperature", "0"]
    assert main(args) == 0
    batched = capsys.readouterr().out
    writes: list[str] = []
    write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda text: writes.append(text) or write(text))
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == batched  # greedy: the same rows, printed the same way
    starts = [i for i, text in enumerate(writes) if text.startswith("=== ")] + [len(writes)]
    assert len(starts) == 4 and starts[0] == 0
    for start, end in zip(starts, starts[1:]):  # each row: header and prompt, then its text piece by piece
        assert end - start >= 4, writes[start:end]


def _scripted_cli(monkeypatch, tmp_path, texts: list[str], eos_after: dict[int, int] | None = None) -> list[str]:
    """CLI arguments for `lmforge generate` on a ScriptedModel continuing `texts` (patched in as the model dir's)."""
    import lmforge.convert
    from lmforge.tokenizer import Tokenizer

    tok = ByteTokenizer()
    model = scripted(texts, tok, eos_after)
    monkeypatch.setattr(lmforge.convert, "load", lambda path: model)
    monkeypatch.setattr(Tokenizer, "load", lambda *args, **kwargs: tok)
    (tmp_path / "lmforge_tokenizer.json").write_text("{}")
    return ["generate", "--model", str(tmp_path), "--device", "cpu", "--temperature", "0", "--max_new_tokens", "17"]


@pytest.mark.parametrize("script, eos_after, stop, expected", [
    ("ab:hello world", {0: 8}, [], "ab:hello\n[eos, 6 tokens]\n"),
    ("ab:one;two", None, [";", "two"], "ab:one\n[stop string ';', 4 tokens]\n"),
    ("ab:line one\nline two and more", None, [], "ab:line one\nline two\n[length, 17 tokens]\n"),
    ("ab:x and more", {0: 3}, [], "ab:\n[eos, 1 token]\n"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_cli_generate_says_why_each_row_ended(monkeypatch, tmp_path, capsys, script, eos_after, stop, expected,
                                              stream):
    args = _scripted_cli(monkeypatch, tmp_path, [script], eos_after) + ["--prompt", "ab:"]
    args += [f"--stop={s}" for s in stop] + (["--stream"] if stream else [])
    from lmforge.cli import main

    assert main(args) == 0
    assert capsys.readouterr().out == expected


def test_cli_generate_several_rows_with_headers(monkeypatch, tmp_path, capsys):
    from lmforge.cli import main

    args = _scripted_cli(monkeypatch, tmp_path, ["ab:hello world", "x:one;two", "q:line one\nline two and more"],
                         eos_after={0: 8})
    assert main(args + ["--prompt", "ab:", "--prompt", "x:", "--prompt", "q:", "--stop", ";"]) == 0
    assert capsys.readouterr().out == ("=== 1/3 ===\nab:hello\n[eos, 6 tokens]\n"
                                       "=== 2/3 ===\nx:one\n[stop string ';', 4 tokens]\n"
                                       "=== 3/3 ===\nq:line one\nline two\n[length, 17 tokens]\n")


def test_cli_generate_and_tokenizer_mismatch(model_dir, tmp_path, capsys):
    import shutil

    from lmforge.cli import main

    assert main(["generate", "--model", str(model_dir), "--prompt", "the", "--max_new_tokens", "3",
                 "--temperature", "0"]) == 0
    small = tmp_path / "small"
    shutil.copytree(model_dir, small)
    cfg = ModelConfig.load(small / "config.json")
    Transformer(ModelConfig.preset("tiny-llama", vocab_size=cfg.vocab_size - 10, block_size=32, d_model=32)).save(small)
    capsys.readouterr()
    assert main(["generate", "--model", str(small), "--prompt", "the"]) == 2
    err = capsys.readouterr().err
    assert "TokenizerMismatch" not in err and str(cfg.vocab_size) in err and str(cfg.vocab_size - 10) in err


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", ""])
def test_resolve_device_rejects_unknown_names(name):
    from lmforge.device import resolve_device
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^device: expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device(name)


def test_resolve_device_auto_cpu_and_missing_cuda(monkeypatch, model_dir):
    from lmforge.device import resolve_device
    from lmforge.errors import ConfigError
    from lmforge.infer.generate import GenerateConfig, run_generate
    from lmforge.train.distributed import init_distributed

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(name)
    with pytest.raises(ConfigError, match=r"^train\.device: 'cuda' requested but CUDA is not available"):
        init_distributed("cuda")
    with pytest.raises(ConfigError, match=r"^device: expected .* got 'gpu'"):
        run_generate(GenerateConfig(model=str(model_dir), prompt=["the"], device="gpu"))
