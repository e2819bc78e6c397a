"""Tiny model directories, the character tokenizer and the synthetic tasks.

``transformers`` is the independent oracle: it must load our ``tokenizer.json`` and model
directories and agree with our own readers.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_smd.errors import ConfigError, FormatError, SMDError
from megatron_smd.model import hf
from megatron_smd.model.tiny import init_model_dir, init_weights, tiny_arch
from megatron_smd.model.tokenizer import CHARSET, CharTokenizer, byte_to_unicode
from megatron_smd.tasks import KEY_SYMBOLS, PAIR_SYMBOLS, Example, Task, TaskConfig, make_task

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def _task_text() -> str:
    kv = make_task(TaskConfig(name="kv_recall", num_pairs=20, num_queries=3)).sample(2, seed=5)
    ar = make_task(TaskConfig(name="arith_chain", num_pairs=20, num_queries=3)).sample(2, seed=5)
    pr = make_task(TaskConfig(name="pair_recall", num_keys=5, num_values=10, num_pairs=5, num_queries=2,
                              note_prob=0.5)).sample(2, seed=5)
    return "\n".join(e.prompt + e.answer for e in kv + ar + pr) + "\n Hello, World! ~`|\\\"'\n"


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = CharTokenizer.build()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 3 + len(CHARSET) == 99
    text = _task_text()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and len(ids) == len(text) + 1  # one token per character
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    with_specials = [tok.bos_id, *tok.encode("a=1", add_bos=False), tok.eos_id]
    assert tok.decode(with_specials, skip_special=False) == "<bos>a=1<eos>"
    assert len(set(tok.encode(CHARSET, add_bos=False))) == len(CHARSET)  # distinct ids

    path = tmp_path / "tokenizer.json"
    tok.save(path)
    tok2 = CharTokenizer.from_file(path)
    assert tok2.encode(text) == ids and tok2.decode(ids) == text
    assert tok2.to_json() == tok.to_json()


def test_byte_alphabet_matches_tokenizers_library():
    from tokenizers import pre_tokenizers

    b2u = byte_to_unicode()
    assert sorted(b2u) == list(range(256)) and len(set(b2u.values())) == 256  # a bijection
    assert set(b2u.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (b2u[ord(" ")], b2u[ord("\n")], b2u[ord("k")]) == ("\u0120", "\u010a", "k")


def test_tokenizer_matches_transformers(tmp_path):
    tok = CharTokenizer.build()
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    oracle = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    text = _task_text()
    assert oracle(text)["input_ids"] == tok.encode(text)  # the post-processor adds <bos> too
    assert oracle(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_bos=False)
    assert oracle.convert_tokens_to_ids(["<pad>", "<bos>", "<eos>"]) == [0, 1, 2]
    ids = tok.encode(text) + [tok.eos_id]
    assert oracle.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text


def test_tokenizer_errors(tmp_path):
    tok = CharTokenizer.build()
    with pytest.raises(SMDError, match="'é' at position 3"):
        tok.encode("k01é=5")
    with pytest.raises(SMDError, match="'<eos>' literally"):
        tok.encode("a<eos>b")
    with pytest.raises(SMDError, match="id 99 is outside"):
        tok.decode([3, 99])
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(FormatError, match=str(bad)):
        CharTokenizer.from_file(bad)
    with pytest.raises(FormatError, match="does not exist"):
        CharTokenizer.from_file(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------- tiny model


def test_tiny_arch_defaults_and_validation():
    q = tiny_arch("qwen2", vocab_size=99)
    ll = tiny_arch("llama", vocab_size=99)
    assert q.tie_word_embeddings and not ll.tie_word_embeddings
    assert (q.head_dim, q.intermediate_size, q.num_queries_per_kv) == (16, 256, 2)
    with pytest.raises(ConfigError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        tiny_arch(vocab_size=99, num_kv_heads=3)
    with pytest.raises(ConfigError, match="hidden_size=30 is not divisible by num_heads=4"):
        tiny_arch(vocab_size=99, hidden_size=30)
    with pytest.raises(ConfigError, match="not supported"):
        tiny_arch("mistral", vocab_size=99)
    with pytest.raises(ConfigError, match="eos_token_id=200"):
        tiny_arch(vocab_size=99, eos_token_id=200)


def test_init_weights_deterministic_and_biases_random():
    arch = tiny_arch("qwen2", vocab_size=99, **SMALL)
    a, b, c = init_weights(arch, seed=3), init_weights(arch, seed=3), init_weights(arch, seed=4)
    assert set(a) == set(hf.expected_shapes(arch))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert all(v.dtype == torch.float32 for v in a.values())
    assert torch.equal(a["model.norm.weight"], torch.ones(32))
    bias = a["model.layers.0.self_attn.q_proj.bias"]
    assert bias.abs().min() > 0 and 0.01 < bias.std() < 0.04  # N(0, 0.02), really non-zero
    state = torch.random.get_rng_state()
    init_weights(arch, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("arch_name", ["qwen2", "llama"])
def test_init_model_dir_round_trip_and_transformers(tmp_path, arch_name):
    d = init_model_dir(tmp_path / arch_name, arch_name, seed=7, **SMALL)
    arch = hf.read_arch(d)
    assert arch == tiny_arch(arch_name, vocab_size=99, **SMALL)
    sd = hf.load_state_dict(d)
    ref = init_weights(arch, seed=7)
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)  # bit-exact
    assert ("lm_head.weight" in sd) == (arch_name == "llama")
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == 2

    model, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_sd = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(hf_sd[k], v), k
    if arch_name == "qwen2":  # tied: HF's lm_head is the embedding
        assert torch.equal(hf_sd["lm_head.weight"], ref["model.embed_tokens.weight"])

    # The directory's tokenizer loads through AutoTokenizer (as SGLang does) with the same ids.
    text = _task_text()
    auto = transformers.AutoTokenizer.from_pretrained(d)
    ours = CharTokenizer.from_file(d / "tokenizer.json")
    # (for qwen2, transformers >= 5 rebuilds a ByteLevel Qwen2Tokenizer from our vocabulary)
    assert auto(text)["input_ids"] == ours.encode(text)
    assert auto.decode(ours.encode(text), skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 0)


def test_init_model_dir_seeds(tmp_path):
    a = hf.load_state_dict(init_model_dir(tmp_path / "a", "llama", seed=1, **SMALL))
    b = hf.load_state_dict(init_model_dir(tmp_path / "b", "llama", seed=1, **SMALL))
    c = hf.load_state_dict(init_model_dir(tmp_path / "c", "llama", seed=2, **SMALL))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="vocab_size is set by the tokenizer"):
        init_model_dir(tmp_path / "d", vocab_size=128)


# ---------------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", ["kv_recall", "arith_chain"])
def test_task_determinism_and_true_answer(name):
    task = make_task(TaskConfig(name=name, num_pairs=24, num_queries=3))
    a, b = task.sample(6, seed=11), task.sample(6, seed=11)
    assert a == b
    assert task.sample(3, seed=11) == a[:3]  # example i does not depend on n
    assert task.sample(6, seed=11) != task.sample(6, seed=12)
    assert len({e.prompt for e in a}) == 6
    tok = CharTokenizer.build()
    for e in a:
        assert task.reward(e, e.answer) == 1.0
        assert task.reward(e, e.answer + "\n") == 1.0  # surrounding whitespace is not an answer field
        assert task.reward(e, "garbage") == 0.0
        assert task.reward(e, "") == 0.0
        assert len(e.answer.split(",")) == 3
        assert tok.decode(tok.encode(e.prompt + e.answer)) == e.prompt + e.answer
        assert len(tok.encode(e.prompt)) <= task.approx_prompt_tokens()


def test_kv_recall_structure_and_partial_credit():
    task = make_task(TaskConfig(name="kv_recall", num_pairs=30, num_queries=3, seed=2))
    for e in task.sample(5):
        body, question = e.prompt.split("?")
        pairs = dict(p.split("=") for p in body.rstrip(";").split(";"))
        assert len(pairs) == 30  # keys unique
        queries = question.rstrip(">").split(",")
        assert len(set(queries)) == 3
        assert e.answer == ",".join(pairs[q] for q in queries)  # independent re-derivation

    # Hand-made example: values 93, 17, 05.
    ex = Example(prompt="k047=93;k112=17;k003=05;?k047,k112,k003>", answer="93,17,05", meta={})
    assert task.reward(ex, "93,17,05") == 1.0
    assert task.reward(ex, "93,18,05") == pytest.approx(2 / 3)
    assert task.reward(ex, "93,17,5") == pytest.approx(2 / 3)  # values are zero-padded, exactly
    assert task.reward(ex, "93,17") == pytest.approx(2 / 3)  # missing field scores 0
    assert task.reward(ex, "93,x,05,11") == pytest.approx(2 / 4)  # extra field dilutes
    assert task.reward(ex, "17,93,05") == pytest.approx(1 / 3)  # order matters
    assert task.reward(ex, "93 ,17,05") == pytest.approx(2 / 3)  # inner spaces are not stripped


def test_pair_recall_structure_reward_and_notes():
    cfg = TaskConfig(name="pair_recall", num_pairs=6, num_values=4, num_queries=1)  # num_keys = num_pairs
    task = make_task(cfg)
    tok = CharTokenizer.build()
    for e in task.sample(20, seed=3):
        assert e.prompt[0] == "?" and len(e.prompt) == 1 + 1 + 6 == task.approx_prompt_tokens() - 1
        q = KEY_SYMBOLS.index(e.prompt[1])
        pairs = [divmod(PAIR_SYMBOLS.index(c), 4) for c in e.prompt[2:]]  # independent decoding of the symbols
        assert sorted(k for k, _ in pairs) == list(range(6))  # distinct keys, all 6 used
        assert e.answer == "=" + str(dict(pairs)[q])  # note_prob 0: never a note
        assert task.reward(e, e.answer) == 1.0 and task.reward(e, e.answer[1:]) == 0.0  # '=' is required
        assert len(tok.encode(e.answer, add_bos=False)) + 1 <= task.max_answer_tokens()
    assert make_task(cfg).sample(5) == task.sample(5)
    ex = task.sample(1)[0]
    v = ex.meta["expected"][0]
    assert task.reward(ex, f"{v}={v}") == task.reward(ex, f"x={v}") == task.reward(ex, f" ={v}\n") == 1.0
    assert task.reward(ex, f"12={v}") == 0.0  # at most one note character
    assert task.reward(ex, f"{v}") == task.reward(ex, "=" + str((int(v) + 1) % 4)) == 0.0
    # note_prob: that share of reference answers writes the value before '=' too; prompts are unchanged
    noted = make_task(cfg.model_copy(update={"note_prob": 0.3})).sample(400, seed=3)
    plain = task.sample(400, seed=3)
    assert [e.prompt for e in noted] == [e.prompt for e in plain]
    share = sum(e.answer == e.meta["expected"][0] + p.answer for e, p in zip(noted, plain)) / 400
    assert 0.22 < share < 0.38 and all(e.answer in (p.answer, p.answer[1] + p.answer) for e, p in zip(noted, plain))
    # two queries: values in query order
    e2 = make_task(TaskConfig(name="pair_recall", num_pairs=4, num_queries=2)).sample(1)[0]
    assert e2.answer == "=" + ",".join(e2.meta["expected"]) and len(e2.prompt) == 1 + 2 + 4
    assert cfg.keys == 6 and TaskConfig(name="pair_recall", num_pairs=9, num_queries=1).keys == 9
    e9 = make_task(TaskConfig(name="pair_recall", num_pairs=3, num_keys=9, num_queries=1)).sample(50)
    assert {c for e in e9 for c in e.prompt[1]} <= set(KEY_SYMBOLS[:9]) and len({e.prompt[1] for e in e9}) > 6
    with pytest.raises(ValueError, match="num_pairs=7 > num_keys=6"):
        TaskConfig(name="pair_recall", num_pairs=7, num_keys=6, num_queries=1)
    with pytest.raises(ValueError, match="pair symbols"):
        TaskConfig(name="pair_recall", num_pairs=6, num_values=10, num_queries=1)


def _eval_arith(prompt: str) -> dict[str, int]:
    """Independent evaluator: executes the assignments as Python with mod 10."""
    env: dict[str, int] = {}
    for stmt in prompt.split("?")[0].rstrip(";").split(";"):
        name, expr = stmt.split("=")
        env[name] = eval(expr, {}, dict(env)) % 10  # noqa: S307 - our own generated text
    return env


def test_arith_chain_values_and_partial_credit():
    cfg = TaskConfig(name="arith_chain", num_pairs=40, num_queries=4, max_depth=3, modulus=10)
    task = make_task(cfg)
    depths = []
    for e in task.sample(8, seed=1):
        env = _eval_arith(e.prompt)
        queries = e.prompt.split("?")[1].rstrip(">").split(",")
        assert e.answer == ",".join(str(env[q]) for q in queries)
        assert len(env) == 40 and all(0 <= v < 10 for v in env.values())
        depths += e.meta["depths"]
    assert min(depths) >= 1 and max(depths) == 3  # queries are updates; chains reach max_depth

    ex = Example(prompt="qer=7;mab=qer+5;tiv=4;zod=mab*3;?zod,mab>", answer="6,2", meta={})
    assert _eval_arith(ex.prompt) == {"qer": 7, "mab": 2, "tiv": 4, "zod": 6}
    assert task.reward(ex, "6,2") == 1.0
    assert task.reward(ex, "6,3") == 0.5
    assert task.reward(ex, "06,2") == 0.5  # canonical decimal only
    assert task.reward(ex, "2,6") == 0.0


@pytest.mark.parametrize("name", ["kv_recall", "arith_chain"])
def test_prompt_length_grows_with_num_pairs(name):
    lengths = []
    for n in (8, 64, 400):
        task = make_task(TaskConfig(name=name, num_pairs=n, num_queries=4))
        toks = [len(e.prompt) + 1 for e in task.sample(3)]
        bound = task.approx_prompt_tokens()
        if name == "kv_recall":  # documented exact formula
            assert toks == [bound] * 3 == [1 + n * 8 + 4 * 5 + 1] * 3
        else:  # upper bound; literals are 4 characters shorter than updates
            assert all(bound - 4 * n <= t <= bound for t in toks)
        lengths.append(min(toks))
    assert lengths[0] < 120 and lengths[-1] > 3000
    print(f"{name}: prompt tokens for num_pairs 8/64/400 = {lengths}")


def test_task_config_validation():
    with pytest.raises(ValueError, match="num_queries=5 > num_pairs=4"):
        TaskConfig(num_pairs=4, num_queries=5)
    with pytest.raises(ValueError, match="raise key_digits"):
        TaskConfig(num_pairs=11, key_digits=1, num_queries=1)
    with pytest.raises(ValueError, match="extra_forbidden"):
        TaskConfig(num_pair=3)
    with pytest.raises(ValueError, match="name"):
        TaskConfig(name="sorting")
    assert isinstance(make_task(TaskConfig()), Task)
    assert TaskConfig.model_json_schema()["properties"]["num_pairs"]["description"]
