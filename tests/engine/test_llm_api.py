"""LLM.generate / LLM.chat, stop strings and ids, max_tokens, logprobs, abort, the CLI."""
import pytest

from kvarn.cli import main as cli_main
from kvarn.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(smol_folder):
    m = LLM("smollm2-135m", kv_cache_dtype="kvarn_k4v2_g128", kv_cache_memory_bytes=128 * 2**20, device="cpu",
            max_model_len=1024)
    yield m
    m.shutdown()


GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_generate_strings_and_token_ids(llm):
    outs = llm.generate(["The capital of France is", "1, 2, 3,"], GREEDY)
    assert [o.prompt for o in outs] == ["The capital of France is", "1, 2, 3,"]
    a, b = outs
    assert a.outputs[0].text == a.text and a.outputs[0].token_ids == a.token_ids
    assert "Paris" in a.text
    ids = llm.get_tokenizer()("The capital of France is")["input_ids"]
    again = llm.generate([ids], GREEDY)[0]
    assert again.token_ids == a.token_ids and again.text == a.text
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_max_tokens_logprobs_and_ignore_eos(llm):
    o = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0))[0]
    assert len(o.token_ids) == 5 and o.finish_reason == "length"
    assert len(o.outputs[0].logprobs) == 5 and all(lp <= 0 for lp in o.outputs[0].logprobs)


def test_stop_string_is_cut_and_stop_token_ids(llm):
    full = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))[0]
    word = full.text.split()[1]                          # a word inside the greedy continuation
    cut = llm.generate("The capital of France is",
                       SamplingParams(temperature=0, max_tokens=12, stop=[word, "zzzz"]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(word)]
    tok = full.token_ids[2]
    by_id = llm.generate("The capital of France is",
                         SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[:3]


def test_streaming_deltas_add_up(llm):
    e = llm.engine
    e.add_request("s", e.tokenizer("Write a list of fruits:")["input_ids"],
                  SamplingParams(temperature=0, max_tokens=16, stop="\n\n"))
    text, ids, last = "", [], None
    while e.has_unfinished_requests():
        for o in e.step():
            text += o.new_text
            ids += o.new_token_ids
            last = o
    assert last.finished and text == last.text and ids == last.token_ids
    assert "\n\n" not in last.text


def test_chat_uses_the_template(llm):
    outs = llm.chat([[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "Say hi."}]],
                    SamplingParams(temperature=0, max_tokens=16))
    assert len(outs) == 2 and all(o.text for o in outs)
    assert outs[0].prompt.startswith("<|im_start|>") and outs[0].prompt.endswith("<|im_start|>assistant\n")
    one = llm.chat([{"role": "user", "content": "What is 2+2?"}], SamplingParams(temperature=0, max_tokens=16))
    assert one[0].token_ids == outs[0].token_ids
    # the ChatML model ends its turn with <|im_end|>, the tokenizer's eos
    assert outs[0].finish_reason in ("stop", "length")


def test_abort_frees_everything(llm):
    e = llm.engine
    ids = e.tokenizer("Once upon a time")["input_ids"]
    e.add_request("a1", ids * 50, SamplingParams(max_tokens=50))
    e.add_request("a2", ids, SamplingParams(max_tokens=50))
    e.step()
    e.step()
    assert e.num_free_blocks < e.num_total_blocks and 0 < e.kv_cache_usage < 1
    e.abort_request("a1")
    e.abort_request("a2")
    e.abort_request("never-added")
    outs = e.step()
    assert {(o.request_id, o.finish_reason) for o in outs} == {("a1", "abort"), ("a2", "abort")}
    assert e.num_free_blocks == e.num_total_blocks and not e.has_unfinished_requests()


def test_bad_requests_raise_and_allocate_nothing(llm):
    e = llm.engine
    with pytest.raises(ValueError, match="max_model_len"):
        e.add_request("big", [1] * 1000, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="non-empty"):
        e.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 49152\)"):
        e.add_request("oov", [49152], SamplingParams())
    e.add_request("dup", [1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already"):
        e.add_request("dup", [1, 2], SamplingParams(max_tokens=1))
    e.abort_request("dup")
    e.step()
    assert e.can_admit(100, 100) and not e.can_admit(1000, 100)
    assert e.num_free_blocks == e.num_total_blocks


def test_cli_generate(capsys, smol_folder):
    rc = cli_main(["generate", "--model", "smollm2-135m", "--kv-cache-dtype", "auto", "--max-tokens", "6",
                   "--kv-cache-memory-bytes", str(64 * 2**20), "--max-model-len", "512", "--device", "cpu",
                   "--json", "The capital of France is"])
    assert rc == 0
    out = capsys.readouterr()
    assert '"text"' in out.out and "Paris" in out.out and "tok/s" in out.err
