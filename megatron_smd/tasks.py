"""Synthetic long-context tasks with exact rewards, where KV-cache eviction hurts.

The tasks spread the facts needed for the answer uniformly over a long prompt and ask about them
only at the end, so a compressed rollout cache (StreamingLLM window, H2O, SnapKV, R-KV) that drops
the wrong positions loses reward, while the dense model can in principle answer everything. Every
prompt and answer uses only characters of the tiny model's vocabulary
(:data:`megatron_smd.model.tokenizer.CHARSET`); with the character tokenizer one character is one
token.

``kv_recall``
    ``num_pairs`` pairs ``k<key>=<value>;`` with unique keys (``key_digits`` digits, so at most
    ``10**key_digits`` pairs) and zero-padded values (``value_digits`` digits), then the question
    ``?`` + ``num_queries`` distinct keys separated by ``,`` + ``>``. The answer is the values in
    query order, separated by ``,``::

        prompt: k047=93;k112=17;k005=40;?k112,k047>
        answer: 17,93

    Prompt length is exactly ``num_pairs * (key_digits + value_digits + 3)
    + num_queries * (key_digits + 2) + 1`` characters, i.e. linear in ``num_pairs``.

``arith_chain``
    ``num_pairs`` assignments to unique three-letter variables. An assignment is either a literal
    ``abc=7;`` or an update of one *earlier* variable, anywhere before it, by a constant:
    ``xyz=abc+5;`` (operators ``+ - *``, constants in ``[1, modulus)``, values taken
    ``mod modulus`` with the non-negative remainder). An update's parent is itself at most
    ``max_depth - 1`` updates away from a literal, so answering needs up to ``max_depth`` look-ups
    back into the prompt plus the arithmetic. The question asks for ``num_queries`` distinct
    variables, chosen among updates (falling back to literals only if a prompt has too few
    updates); the answer is their values in decimal, in query order::

        prompt: qer=7;mab=qer+5;tiv=4;zod=mab*3;?zod,mab>      (modulus 10)
        answer: 6,2

``pair_recall``
    A look-up that needs no induction circuit: each pair is ONE character whose identity encodes
    (key ``k``, value ``v``), ``PAIR_SYMBOLS[k * num_values + v]`` (``a``-``z`` then punctuation),
    so a one-layer content match finds it. The question comes FIRST: ``?`` and ``num_queries``
    distinct key symbols (``KEY_SYMBOLS[k]``: ``A``, ``B``, ...), then ``num_pairs`` pairs with
    distinct keys among ``num_keys`` (default ``num_pairs``: every key once). The answer is ``=`` then the values in query order, separated
    by ``,``. With 6 keys and ``num_values=4`` (key ``A`` = symbols ``abcd`` for values 0-3,
    ``B`` = ``efgh``, ...)::

        prompt: ?Bnfwdkr        (query key 1 = 'B'; pairs (3,1) (1,1) (5,2) (0,3) (2,2) (4,1))
        answer: =1

    The leading ``=`` is on purpose: engines sample the first completion token from the dense
    prefill, so only tokens after it see the compressed cache; with ``=`` first, the value is read
    under the eviction policy's cache (otherwise eviction could not change a one-token answer).
    Query first: while reading the prompt densely the model already knows the question, so a
    policy can learn to carry the answer into the tokens its cache keeps (the recent window).

Reward (all tasks): the completion (decoded text up to, excluding, ``<eos>``) is stripped of
surrounding whitespace and split on ``,``; field ``i`` scores iff it equals the expected string
exactly (no leading zeros for ``arith_chain``, zero-padded for ``kv_recall``). The reward is
``correct / max(num_queries, number_of_fields)``: unparsable fields score 0, and appending extra
fields dilutes the reward, so a policy cannot gain by rambling. Always in ``[0, 1]``.

Sampling is deterministic: example ``i`` of ``sample(n, seed)`` comes from its own
``random.Random("<name>:<seed>:<i>")`` (string seeds hash with SHA-512, stable across processes
and Python versions), so ``sample(n)[:k] == sample(k)``.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ARITH_NAME_LEN = 3
ARITH_OPS = "+-*"
# pair_recall alphabets (fixed, so a trained model's table never changes): keys are queried by an
# upper-case letter; a (key, value) pair is one of these symbols (no digit and no ?=>,; separator).
KEY_SYMBOLS = string.ascii_uppercase
PAIR_SYMBOLS = string.ascii_lowercase + "".join(c for c in string.punctuation if c not in "?=>,;")


class TaskConfig(BaseModel):
    """Which synthetic task and how large; one of these per experiment (YAML key ``task``)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["kv_recall", "arith_chain", "pair_recall"] = Field(
        "kv_recall", description="Task family: 'kv_recall' (look up keys), 'arith_chain' (evaluate assignments) or "
                                 "'pair_recall' (look up one-character key-value pairs).")
    num_pairs: int = Field(
        16, ge=1, description="kv_recall: number of key=value pairs; arith_chain: number of assignments. "
                              "Sets the prompt length (about 8-10 tokens each with the defaults).")
    num_queries: int = Field(2, ge=1, description="How many keys / variables the question asks for (<= num_pairs).")
    seed: int = Field(0, description="Default seed of Task.sample when no seed is passed.")
    key_digits: int = Field(
        3, ge=1, le=6, description="kv_recall: digits per key ('k047' has 3); allows up to 10**key_digits pairs.")
    value_digits: int = Field(2, ge=1, le=6, description="kv_recall: digits per value, zero-padded ('07').")
    num_keys: int | None = Field(
        None, ge=1, le=len(KEY_SYMBOLS), description="pair_recall: size of the key alphabet (keys 'A', 'B', ...); "
                                                     "default num_pairs (every key appears once per prompt).")
    num_values: int = Field(
        4, ge=1, le=10, description="pair_recall: values per key (answer digits 0..num_values-1); "
                                    "num_keys * num_values pair symbols are used (at most 53).")
    note_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="pair_recall: share of reference answers that write the value once BEFORE "
                                         "the '=' too ('1=1'); the reward only reads the text after '='.")
    modulus: int = Field(
        10, ge=2, le=1000, description="arith_chain: all values are taken mod this; 10 keeps every value one token.")
    max_depth: int = Field(
        2, ge=1, description="arith_chain: longest chain of updates from a literal (1 = every update reads a literal).")
    literal_prob: float = Field(
        0.4, gt=0.0, lt=1.0, description="arith_chain: probability that an assignment (other than the first) is "
                                         "a literal rather than an update.")

    @property
    def keys(self) -> int:
        """pair_recall's key alphabet size: ``num_keys``, or ``num_pairs`` when unset."""
        return self.num_keys or self.num_pairs

    @model_validator(mode="after")
    def _check_sizes(self) -> TaskConfig:
        if self.num_queries > self.num_pairs:
            raise ValueError(f"num_queries={self.num_queries} > num_pairs={self.num_pairs}: "
                             f"queries must be distinct keys of the prompt")
        if self.name == "kv_recall" and self.num_pairs > 10 ** self.key_digits:
            raise ValueError(f"num_pairs={self.num_pairs} > 10**key_digits={10 ** self.key_digits}: "
                             f"not enough unique keys; raise key_digits")
        if self.name == "pair_recall" and self.num_pairs > self.keys:
            raise ValueError(f"num_pairs={self.num_pairs} > num_keys={self.keys}: pairs need distinct keys")
        if self.name == "pair_recall" and self.keys * self.num_values > len(PAIR_SYMBOLS):
            raise ValueError(f"num_keys * num_values = {self.keys} * {self.num_values} > {len(PAIR_SYMBOLS)} "
                             f"pair symbols (num_keys defaults to num_pairs)")
        if self.name == "arith_chain" and self.num_pairs > len(string.ascii_lowercase) ** ARITH_NAME_LEN:
            raise ValueError(f"num_pairs={self.num_pairs} exceeds the {26 ** ARITH_NAME_LEN} unique variable names")
        return self


@dataclass
class Example:
    """One prompt with its reference answer; ``meta`` holds the query list and per-task details."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)


def _kv_recall(cfg: TaskConfig, rng: random.Random) -> tuple[str, str, dict]:
    keys = rng.sample(range(10 ** cfg.key_digits), cfg.num_pairs)
    vals = [rng.randrange(10 ** cfg.value_digits) for _ in keys]
    key_s = [f"k{k:0{cfg.key_digits}d}" for k in keys]
    val_s = [f"{v:0{cfg.value_digits}d}" for v in vals]
    q_idx = rng.sample(range(cfg.num_pairs), cfg.num_queries)
    prompt = "".join(f"{k}={v};" for k, v in zip(key_s, val_s)) + "?" + ",".join(key_s[i] for i in q_idx) + ">"
    expected = [val_s[i] for i in q_idx]
    # query_positions: index of the queried pair in the prompt (0 = first), for eviction analysis.
    meta = {"queries": [key_s[i] for i in q_idx], "expected": expected, "query_positions": q_idx}
    return prompt, ",".join(expected), meta


def _arith_chain(cfg: TaskConfig, rng: random.Random) -> tuple[str, str, dict]:
    m = cfg.modulus
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < cfg.num_pairs:
        n = "".join(rng.choice(string.ascii_lowercase) for _ in range(ARITH_NAME_LEN))
        if n not in seen:
            seen.add(n)
            names.append(n)
    values: list[int] = []
    depths: list[int] = []  # 0 = literal, d = d updates away from a literal
    stmts: list[str] = []
    for i, name in enumerate(names):
        parents = [j for j in range(i) if depths[j] < cfg.max_depth]
        if not parents or rng.random() < cfg.literal_prob:
            v = rng.randrange(m)
            stmts.append(f"{name}={v};")
            values.append(v)
            depths.append(0)
            continue
        j = rng.choice(parents)
        op = rng.choice(ARITH_OPS)
        c = rng.randrange(1, m)
        v = {"+": values[j] + c, "-": values[j] - c, "*": values[j] * c}[op] % m
        stmts.append(f"{name}={names[j]}{op}{c};")
        values.append(v)
        depths.append(depths[j] + 1)
    updates = [i for i in range(cfg.num_pairs) if depths[i] > 0]
    if len(updates) >= cfg.num_queries:
        q_idx = rng.sample(updates, cfg.num_queries)
    else:  # rare with few assignments: top up with literals
        literals = [i for i in range(cfg.num_pairs) if depths[i] == 0]
        q_idx = updates + rng.sample(literals, cfg.num_queries - len(updates))
        rng.shuffle(q_idx)
    prompt = "".join(stmts) + "?" + ",".join(names[i] for i in q_idx) + ">"
    expected = [str(values[i]) for i in q_idx]
    meta = {"queries": [names[i] for i in q_idx], "expected": expected, "query_positions": q_idx,
            "depths": [depths[i] for i in q_idx]}
    return prompt, ",".join(expected), meta


def _pair_recall(cfg: TaskConfig, rng: random.Random) -> tuple[str, str, dict]:
    keys = rng.sample(range(cfg.keys), cfg.num_pairs)
    vals = [rng.randrange(cfg.num_values) for _ in keys]
    q_idx = rng.sample(range(cfg.num_pairs), cfg.num_queries)
    prompt = ("?" + "".join(KEY_SYMBOLS[keys[i]] for i in q_idx)
              + "".join(PAIR_SYMBOLS[k * cfg.num_values + v] for k, v in zip(keys, vals)))
    expected = [str(vals[i]) for i in q_idx]
    meta = {"queries": [KEY_SYMBOLS[keys[i]] for i in q_idx], "expected": expected, "query_positions": q_idx}
    note = expected[0] if rng.random() < cfg.note_prob else ""
    return prompt, note + "=" + ",".join(expected), meta


_GENERATORS = {"kv_recall": _kv_recall, "arith_chain": _arith_chain, "pair_recall": _pair_recall}


def score_fields(expected: list[str], completion: str) -> float:
    """``correct / max(len(expected), len(fields))`` with fields = ``completion.strip().split(',')``."""
    fields = completion.strip().split(",")
    correct = sum(1 for want, got in zip(expected, fields) if want == got)
    return correct / max(len(expected), len(fields))


class Task:
    """A seeded generator of :class:`Example` s and their exact reward (see the module docstring)."""

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self._gen = _GENERATORS[cfg.name]

    @property
    def name(self) -> str:
        return self.cfg.name

    def sample(self, n: int, seed: int | None = None) -> list[Example]:
        """``n`` examples, deterministic for ``(cfg, seed)``; ``seed`` defaults to ``cfg.seed``."""
        seed = self.cfg.seed if seed is None else int(seed)
        out = []
        for i in range(n):
            rng = random.Random(f"{self.cfg.name}:{seed}:{i}")
            prompt, answer, meta = self._gen(self.cfg, rng)
            meta.update({"task": self.cfg.name, "seed": seed, "index": i})
            out.append(Example(prompt=prompt, answer=answer, meta=meta))
        return out

    def reward(self, example: Example, completion: str) -> float:
        """Fraction of queries answered exactly, in ``[0, 1]``; ``completion`` excludes ``<eos>``."""
        if self.cfg.name == "pair_recall":
            note, eq, rest = completion.strip().partition("=")
            if not eq or len(note) > 1:
                return 0.0
            return score_fields(example.meta["expected"], rest)
        return score_fields(example.answer.split(","), completion)

    def approx_prompt_tokens(self) -> int:
        """Prompt tokens including ``<bos>`` with the character tokenizer.

        Exact for ``kv_recall`` and ``pair_recall``; an upper bound for ``arith_chain`` (every assignment counted as an
        update with a constant of the widest width), tight with ``modulus <= 10``.
        """
        c = self.cfg
        if c.name == "kv_recall":
            body = c.num_pairs * (1 + c.key_digits + 1 + c.value_digits + 1)
            question = 1 + c.num_queries * (1 + c.key_digits) + (c.num_queries - 1) + 1
        elif c.name == "pair_recall":
            body, question = c.num_pairs, 1 + c.num_queries
        else:
            width = len(str(c.modulus - 1))
            body = c.num_pairs * (ARITH_NAME_LEN + 1 + ARITH_NAME_LEN + 1 + width + 1)
            question = 1 + c.num_queries * ARITH_NAME_LEN + (c.num_queries - 1) + 1
        return 1 + body + question

    def max_answer_tokens(self) -> int:
        """Longest reference answer plus ``<eos>``: a sensible generation budget for the task."""
        c = self.cfg
        if c.name == "pair_recall":
            return 2 + c.num_queries + (c.num_queries - 1) + 1  # note, '=', values, commas, <eos>
        width = c.value_digits if c.name == "kv_recall" else len(str(c.modulus - 1))
        return c.num_queries * width + (c.num_queries - 1) + 1


def make_task(cfg: TaskConfig) -> Task:
    """The :class:`Task` for ``cfg`` (one class serves both families; dispatch is on ``cfg.name``)."""
    return Task(cfg)
