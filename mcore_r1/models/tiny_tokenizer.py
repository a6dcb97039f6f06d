"""A small, deterministic, offline Qwen-style tokenizer for the tiny test models.

Why train one instead of copying Qwen's: the real vocabulary has ~151k entries, which would make
the embedding and LM-head matrices of a "tiny" model dominate its size (151k x 256 floats) and
cannot be obtained without a download. Instead we train a byte-level BPE on a synthetic corpus
that covers exactly the text our synthetic RL tasks produce (counting questions about coloured
shapes, small arithmetic, step-by-step reasoning with ``<think>``/``<answer>``/``\\boxed{}``).

What stays faithful to Qwen:

* the same pipeline as ``transformers``' ``Qwen2Tokenizer`` (NFC normaliser, Qwen's
  pre-tokenisation regex that splits digits one by one, byte-level alphabet), so every string
  encodes, no unknown token exists and numbers tokenise digit by digit as in Qwen;
* Qwen's special tokens and a Qwen-style ChatML chat template, including VL image/video parts;
* eos = ``<|im_end|>``, pad = ``<|endoftext|>``, no BOS is prepended.

Determinism: the corpus comes from ``random.Random(CORPUS_SEED)`` and never touches Python's
salted ``hash``; the special tokens are handed to the BPE trainer first, so they get the fixed
ids ``0..len(SPECIAL_TOKENS)-1`` (``SPECIAL_TOKEN_IDS``) and a model config can state them
without training anything. The ``tokenizers`` BPE trainer picks each merge by (count, pair),
so its output does not depend on its thread pool; the tests check this by training in a
subprocess with a different ``RAYON_NUM_THREADS`` and comparing. The tokenizer does not depend
on the model seed, so all tiny models share one vocabulary.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

CORPUS_SEED = 0
CORPUS_LINES = 6000
# Target of the BPE trainer; the corpus is small, so the result lands somewhat below it.
BPE_VOCAB_TARGET = 1600

# Order matters: the position in this tuple is the token id (the trainer puts them first).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<think>", "</think>",
)
SPECIAL_TOKEN_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
# As in Qwen3, the reasoning markers are added tokens but not "special": decoding with
# skip_special_tokens=True keeps them, which reward functions rely on.
NON_SKIPPED_TOKENS = frozenset({"<think>", "</think>"})
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2's pre-tokenisation regex (identical to transformers' qwen2 PRETOKENIZE_REGEX).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML as used by Qwen2/2.5/3. Content may be a string or a list of parts; image and video
# parts become the vision placeholders that the Qwen2-VL processor / vLLM expand per patch.
# Unlike Qwen2-VL's template no default system prompt is injected: prompts stay short and the
# template is identical for text and VL models.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
OPERATORS = ("+", "-", "*", "/")
# General words so that ordinary prompts (and system prompts) tokenise into sensible pieces.
COMMON_WORDS = (
    "the a an and or of to in on at for with without from by is are was were be been has have "
    "had do does did not no yes this that these those there here it its they them their we you "
    "your he she his her i me my what which who when where why how many much more most less few "
    "some any all each every one two three four five six seven eight nine ten zero number numbers "
    "count counting total sum difference product quotient plus minus times divided equals equal "
    "first second third next then so because therefore result answer question solve problem "
    "image picture shape shapes color colors colour left right top bottom middle center small "
    "large big tiny above below near next only also again check verify correct wrong final "
    "please reason carefully think step steps let us see look find give put inside box format "
    "helpful assistant user system you are respond briefly clearly math visual "
    "about after against along among around before behind between beyond during except inside "
    "into like near off onto outside over past since through toward under until upon within "
    "able above across actually add added adding almost already always another apart appear "
    "area around ask became become begin being believe best better both bring build built call "
    "came can cannot case change children city close come common compare complete consider "
    "could course cover cross current day describe detail different direction distance divide "
    "down draw during early easy edge either else end enough even example explain fact far "
    "feel field figure fill follow form found free full general get go good great group grow "
    "half hand hard head hear help high hold home idea important include increase keep kind "
    "know known last later learn leave length line list little long made make mark may mean "
    "measure might mind move must name need never new night now object often old open order "
    "other our out own page pair part pattern people place plan point position possible power "
    "present probably pull quick quite rather read ready real remove rest return row rule run "
    "said same say seem set several should show side simple since size so sort sound space "
    "start state still stop story such sure table take tell than thing think though thought "
    "together too took turn under unit up upon use used using value very want watch water way "
    "well went while whole will word work world would write year yet"
).split()
REASONING_OPENERS = (
    "Let me think step by step.", "Let me count carefully.", "First, I look at the image.",
    "I need to compute this.", "Let me check the answer again.",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Think first inside <think> </think>, then give the answer inside <answer> </answer>.",
)


def _counting_example(rng: random.Random) -> str:
    color, (shape, plural) = rng.choice(COLORS), rng.choice(list(SHAPES.items()))
    n = rng.randint(0, 12)
    noun = shape if n == 1 else plural
    verb = "is" if n == 1 else "are"
    question = rng.choice((
        f"How many {color} {plural} are in the image?",
        f"Count the {color} {plural} in the picture.",
        f"How many {plural} are there?",
    ))
    other = f"{rng.randint(1, 5)} {rng.choice(COLORS)} {rng.choice(list(SHAPES.values()))}"
    reasoning = f"I see {n} {color} {noun} and {other}. There {verb} {n} {color} {noun}."
    return f"{question}\n{rng.choice(REASONING_OPENERS)} {reasoning}"


def _arithmetic_example(rng: random.Random) -> str:
    a, b, op = rng.randint(0, 200), rng.randint(0, 200), rng.choice(OPERATORS)
    if op == "/":
        b = max(b % 20, 1)
        a = b * rng.randint(0, 10)
    ops = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a // b}
    result = ops[op]()
    return f"What is {a} {op} {b}?\n{rng.choice(REASONING_OPENERS)} {a} {op} {b} = {result}."


def _answer_format(rng: random.Random, body: str, answer: int) -> str:
    """Wrap a worked example in one of the answer formats the reward functions parse."""
    style = rng.randrange(3)
    if style == 0:
        return f"<think>\n{body}\n</think>\n<answer>{answer}</answer>"
    if style == 1:
        return f"<think>{body}</think>\nThe answer is \\boxed{{{answer}}}."
    return f"{body}\nThe answer is {answer}.\nFinal answer: \\boxed{{{answer}}}"


def _chat_line(rng: random.Random, user: str, assistant: str) -> str:
    system = rng.choice(SYSTEM_PROMPTS)
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{assistant}<|im_end|>\n")


def synthetic_corpus(seed: int = CORPUS_SEED, n_lines: int = CORPUS_LINES) -> Iterator[str]:
    """Yield the deterministic training corpus: task-shaped text plus generic filler words."""
    rng = random.Random(seed)
    for _ in range(n_lines):
        kind = rng.randrange(4)
        if kind == 0:
            text = _counting_example(rng)
            yield _answer_format(rng, text, rng.randint(0, 12))
        elif kind == 1:
            text = _arithmetic_example(rng)
            yield _answer_format(rng, text, rng.randint(-200, 2000))
        elif kind == 2:
            yield _chat_line(rng, "<|vision_start|><|image_pad|><|vision_end|>"
                             + _counting_example(rng), f"There are {rng.randint(0, 12)}.")
        else:
            words = rng.choices(COMMON_WORDS, k=rng.randint(5, 16))
            yield " ".join(words).capitalize() + rng.choice((".", "?", "!", ",", ":", ";")) + "\n"


def _without_special_tokens(lines: Iterator[str]) -> Iterator[str]:
    """Cut special tokens out of the training text, yielding the pieces between them.

    The trainer does not honour added tokens, so left in they would make BPE spend merges on
    fragments such as "<|im" or "_pad|>" that encoding never produces (specials are matched
    whole before BPE runs). Each piece is a separate sequence, so no merge spans a cut.
    """
    pattern = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    for line in lines:
        yield from (piece for piece in pattern.split(line) if piece)


def _pipeline(model: BPE) -> Tokenizer:
    """A ``tokenizers`` object with exactly Qwen2Tokenizer's normaliser/pre-tokeniser/decoder."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


@functools.lru_cache(maxsize=1)
def train_bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Train the BPE once per process; returns (vocab items sorted by id, merges) as tuples."""
    tok = _pipeline(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_TARGET, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet makes every string encodable even if the corpus lacks a byte.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_without_special_tokens(synthetic_corpus()), trainer=trainer)
    # The Python API exposes merges only through the JSON serialisation.
    model = json.loads(tok.to_str())["model"]
    vocab = tuple(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                   for m in model["merges"])
    for token, expected_id in SPECIAL_TOKEN_IDS.items():
        if model["vocab"].get(token) != expected_id:
            raise RuntimeError(f"BPE trainer gave {token!r} id {model['vocab'].get(token)}, "
                               f"expected {expected_id}")
    return vocab, merges


def build_tiny_tokenizer():
    """Return a ``transformers`` Qwen2 tokenizer (fast, ``tokenizers``-backed) with chat template."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe()
    special = [t for t in SPECIAL_TOKENS if t not in NON_SKIPPED_TOKENS and t not in
               (EOS_TOKEN, PAD_TOKEN)]
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab), merges=list(merges),
        unk_token=None, bos_token=None, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        extra_special_tokens=special, model_max_length=4096, chat_template=CHAT_TEMPLATE,
        errors="replace", clean_up_tokenization_spaces=False, split_special_tokens=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t in SPECIAL_TOKENS if t in NON_SKIPPED_TOKENS])
    _check_ids(tokenizer)
    return tokenizer


def _check_ids(tokenizer) -> None:
    """Fail loudly if any special token did not keep its fixed id."""
    for token, expected_id in SPECIAL_TOKEN_IDS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected_id:
            raise RuntimeError(f"tiny tokenizer: {token!r} has id {got}, expected {expected_id}")
        if tokenizer.encode(token, add_special_tokens=False) != [expected_id]:
            raise RuntimeError(f"tiny tokenizer: {token!r} does not encode as a single token")
