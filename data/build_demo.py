"""Build the small demo data set (SFT, reward-model and PPO splits) from chatterbot-corpus.

The demo pipeline (``pipeline.yaml``) trains on a laptop CPU in minutes, so the data must be
small, short and carry a preference signal that a 135M-parameter model learns in one epoch.
This script turns the English part of the BSD-licensed chatterbot-corpus into

    data/demo/sft_train.jsonl  sft_eval.jsonl   {"messages": [user, assistant, ...]}
    data/demo/rm_train.jsonl   rm_eval.jsonl    {"prompt": [user], "chosen": [assistant],
                                                 "rejected": [assistant], "rejected_kind": str}
    data/demo/ppo_train.jsonl  ppo_eval.jsonl   {"prompt": [user]}

The output is byte-identical on every run: files are read in sorted order, every random choice
comes from a ``random.Random`` seeded with a string (which Python hashes with SHA-512, not with
the randomised ``hash()``), and nothing iterates over a set or relies on dict order that came
from one. See data/README.md for the design of the preference pairs.

Usage (chatterbot-corpus is only needed here, never by the package):

    pip install --no-deps chatterbot-corpus==1.3.3 pyyaml
    python data/build_demo.py [--out data/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

SEED = "rlhf-demo-v1"

# Share of prompt groups held out for the eval splits of every stage.
EVAL_FRACTION = 0.15

# Target sizes (upper bounds; a split gets fewer rows when the corpus has fewer).
SFT_TRAIN_SIZE = 240  # two epochs of 30 steps of 8
SFT_EVAL_SIZE = 60
RM_TRAIN_SIZE = 320  # two epochs of 40 steps of 8 pairs: the RM stage of `make run` stays within minutes
RM_EVAL_SIZE = 100
PPO_TRAIN_SIZE = 200
PPO_EVAL_SIZE = 50

# The corpus replies are short; longer ones (code listings, dictionary definitions) would
# not fit the 48-token PPO responses and slow the CPU demo down.
MAX_REPLY_CHARS = 200
MAX_PROMPT_CHARS = 200
# No prompt may dominate (the corpus has 31 replies to "Tell me a joke").
MAX_PAIRS_PER_PROMPT = 3

# In these files a conversation lists alternative bot replies to its first line, not a
# dialogue: "You are arrogant" / "Arrogance is not one of my emotions." / "I have no real
# emotions, so how can I be arrogant?" / ...
ALTERNATIVE_REPLY_FILES = ("computers", "emotion")

# Small talk about the bot itself: a reply from one of these categories can fit a prompt from
# another of them ("Are you sentient?" / "I have no real emotions..."), so an off-topic reply
# for a small-talk prompt is drawn from outside this group.
SMALL_TALK = ("ai", "botprofile", "conversations", "emotion", "gossip", "greetings",
              "health", "humor", "psychology")

# Quiz questions on unrelated subjects: the answer to one is off topic for any other, so an
# off-topic reply for a quiz question may come from the same file. (Elsewhere a file is about
# one subject: "stock market" / "invest in yourself." fits "what is the stock market".)
INDEPENDENT_QUESTIONS = ("trivia",)

# PPO prompts must be ones the SFT model can answer in 48 tokens: no code, no quiz questions
# whose answer is a fact a 135M model does not know.
PPO_EXCLUDED_CATEGORIES = ("coding", "trivia")
PPO_MAX_REFERENCE_CHARS = 150

# Rejected kinds and their target shares of the pairs. Each is a failure mode of a language
# model; see data/README.md.
REJECTED_KINDS = (
    ("off_topic", 0.30),      # a fluent reply to a different question
    ("truncated", 0.14),      # cut off mid-sentence (hit the token limit)
    ("repetition", 0.14),     # degenerate loop of a phrase from the reply
    ("repeat_prompt", 0.14),  # parrots the user's message back
    ("evasive", 0.14),        # generic non-answer ("I'm not sure.")
    ("word_salad", 0.14),     # incoherent: the reply's words in random order
)

EVASIVE_REPLIES = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea, sorry.",
    "Sorry, I don't understand.",
    "I'd rather not say.",
    "I can't answer that right now.",
    "That's a good question. I'm not sure.",
    "Sorry, I don't have an answer to that.",
    "Hmm, I'm not sure what to say about that.",
    "I'm sorry, but I can't help you with that question.",
    "That is an interesting question, but I don't really know the answer.",
    "I'm afraid I don't have enough information to answer that question.",
)

_WORD = re.compile(r"[a-z0-9]+")


def norm(text: str) -> str:
    """Comparison key: lower case, letters and digits only, single spaces."""
    return " ".join(_WORD.findall(text.lower()))


EVASIVE_KEYS = tuple(norm(r) for r in EVASIVE_REPLIES)


def clean(text: str) -> str:
    """Corpus text as a message: outer whitespace stripped, inner runs of spaces collapsed."""
    return " ".join(text.split())


def rng_for(name: str) -> random.Random:
    # A str seed is hashed with SHA-512 (random.seed version 2): stable across processes.
    return random.Random(f"{SEED}/{name}")


@dataclass(frozen=True)
class Dialogue:
    category: str
    turns: tuple[str, ...]  # user, assistant, user, assistant, ...

    @property
    def key(self) -> str:
        return norm(self.turns[0])


@dataclass(frozen=True)
class Pair:
    category: str
    prompt: str
    reply: str

    @property
    def key(self) -> str:
        return norm(self.prompt)


# --------------------------------------------------------------------------------------------
# Reading the corpus


def corpus_dir() -> Path:
    try:
        import chatterbot_corpus
    except ImportError:
        sys.exit("build_demo.py needs chatterbot-corpus: "
                 "pip install --no-deps chatterbot-corpus==1.3.3 pyyaml")
    return Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"


def read_corpus(directory: Path) -> list[Dialogue]:
    """Every usable dialogue of the English corpus, in file order then conversation order."""
    import yaml

    dialogues: list[Dialogue] = []
    seen: dict[tuple[str, ...], None] = {}
    for path in sorted(directory.glob("*.yml")):
        category = path.stem
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conversation in doc.get("conversations") or []:
            # One corpus entry (trivia.yml, "two little ducks") is a string, not a list.
            if not isinstance(conversation, list) or not all(isinstance(t, str) for t in conversation):
                continue
            turns = [clean(t) for t in conversation]
            if category in ALTERNATIVE_REPLY_FILES:
                candidates = [(turns[0], reply) for reply in turns[1:]]
            else:
                candidates = [tuple(turns)]
            for candidate in candidates:
                dialogue = _usable(category, candidate)
                if dialogue is None:
                    continue
                ident = tuple(norm(t) for t in dialogue.turns)
                if ident in seen:  # tech_support.yml repeats each exchange ~100 times
                    continue
                seen[ident] = None
                dialogues.append(dialogue)
    return dialogues


def _usable(category: str, turns: tuple[str, ...]) -> Dialogue | None:
    """The longest clean prefix of a conversation that ends on an assistant turn, or None."""
    kept: list[str] = []
    user_keys: list[str] = []
    for i in range(0, len(turns) - 1, 2):
        user, reply = turns[i], turns[i + 1]
        if not user or not reply or "```" in reply:
            break
        if len(user) > MAX_PROMPT_CHARS or len(reply) > MAX_REPLY_CHARS:
            break
        # "you are immature" / "you are immature": a parrot is one of our rejected kinds.
        if norm(reply) == norm(user) or not norm(reply) or not norm(user):
            break
        if norm(reply) in EVASIVE_KEYS:
            break
        # literature.yml asks "who is geoffrey chaucer" twice in one conversation.
        if norm(user) in user_keys:
            break
        user_keys.append(norm(user))
        kept += [user, reply]
    return Dialogue(category, tuple(kept)) if kept else None


# --------------------------------------------------------------------------------------------
# Splitting


def split_keys(dialogues: list[Dialogue]) -> dict[str, str]:
    """Map every user-turn key to "train" or "eval".

    Keys that occur in one dialogue are tied together (union-find), so no user message of an
    eval row ever appears in a train row of any stage.
    """
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for d in dialogues:
        keys = [norm(t) for t in d.turns[0::2]]
        for k in keys:
            parent.setdefault(k, k)
        for k in keys[1:]:
            a, b = find(keys[0]), find(k)
            if a != b:
                parent[max(a, b)] = min(a, b)

    groups: dict[str, list[str]] = {}
    for k in sorted(parent):
        groups.setdefault(find(k), []).append(k)
    roots = sorted(groups)
    rng_for("split").shuffle(roots)
    n_eval = round(EVAL_FRACTION * len(roots))
    eval_roots = roots[:n_eval]
    assignment = {k: "train" for k in parent}
    for root in eval_roots:
        for k in groups[root]:
            assignment[k] = "eval"
    return assignment


def cap_per_prompt(items: list, key, limit: int, name: str) -> list:
    """At most ``limit`` items per prompt key, chosen at random, in their original order."""
    by_key: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_key.setdefault(key(item), []).append(i)
    rng = rng_for(f"cap/{name}")
    keep: list[int] = []
    for k in sorted(by_key):
        idx = by_key[k]
        keep += idx if len(idx) <= limit else rng.sample(idx, limit)
    return [items[i] for i in sorted(keep)]


def take(items: list, n: int, name: str) -> list:
    """A random sample of at most n items, shuffled (so rows are not grouped by category)."""
    items = list(items)
    rng_for(f"take/{name}").shuffle(items)
    return items[:n]


# --------------------------------------------------------------------------------------------
# Rejected replies


def _words(text: str) -> list[str]:
    return text.split()


def make_truncated(pair: Pair, rng: random.Random) -> str | None:
    """The reply cut off mid-sentence, as when generation hits max_new_tokens."""
    words = _words(pair.reply)
    if len(words) < 6:
        return None
    lo, hi = max(2, round(0.35 * len(words))), max(2, round(0.7 * len(words)))
    # Never cut right after a sentence end: that would be a complete, shorter answer.
    cuts = [k for k in range(lo, hi + 1) if k < len(words) and not words[k - 1].endswith((".", "!", "?"))]
    if not cuts:
        return None
    return " ".join(words[: rng.choice(cuts)]).rstrip(",;:-")


def make_repetition(pair: Pair, rng: random.Random) -> str | None:
    """A degenerate loop: the opening phrase of the reply, repeated to about its length."""
    words = _words(pair.reply)
    if len(words) < 4:
        return None
    n = rng.randint(2, min(5, len(words) - 1))
    phrase = " ".join(words[:n]).rstrip(",;:")
    copies = max(3, round(len(words) / n))
    sep = " " if phrase.endswith((".", "!", "?")) else ", "
    return sep.join([phrase] * copies)


def make_repeat_prompt(pair: Pair, rng: random.Random) -> str | None:
    """The user's message echoed back instead of an answer."""
    if norm(pair.prompt) in norm(pair.reply):
        return None
    # A long quiz question echoed against a one-word answer would mostly teach length.
    if len(_words(pair.prompt)) > 2 * len(_words(pair.reply)) + 2:
        return None
    return pair.prompt


def make_evasive(pair: Pair, rng: random.Random) -> str | None:
    """A generic non-answer of about the reply's length, only against replies that say something."""
    n = len(_words(pair.reply))
    if n < 4:
        return None
    nearest = sorted(EVASIVE_REPLIES, key=lambda r: (abs(len(_words(r)) - n), EVASIVE_REPLIES.index(r)))
    return rng.choice(nearest[:4])


def make_word_salad(pair: Pair, rng: random.Random) -> str | None:
    """Incoherent output: the reply's own words in a random order."""
    words = _words(pair.reply)
    if len(words) < 5:
        return None
    for _ in range(10):
        shuffled = words[:]
        rng.shuffle(shuffled)
        moved = sum(a != b for a, b in zip(words, shuffled))
        if moved >= len(words) // 2:
            return " ".join(shuffled)
    return None


class OffTopic:
    """Replies from other conversations, matched in length to the reply they stand in for."""

    def __init__(self, pool: list[Pair]):
        # Statements only: a counter-question ("What do you mean?") fits almost any prompt, and
        # so does a short small-talk reply ("Good.", "Yes it is."). Short facts ("Sputnik 1")
        # stay: they keep off-topic replies as short as the quiz answers they stand in for.
        self.pool = [
            p for p in pool
            if not p.reply.endswith("?")
            and (p.category not in SMALL_TALK or len(_words(p.reply)) >= 4)
        ]
        self.used = [0] * len(self.pool)

    def __call__(self, pair: Pair, rng: random.Random) -> str | None:
        small_talk = pair.category in SMALL_TALK
        n = len(pair.reply)
        candidates = [
            i for i, p in enumerate(self.pool)
            if (p.category != pair.category or pair.category in INDEPENDENT_QUESTIONS)
            and not (small_talk and p.category in SMALL_TALK)
            and p.key != pair.key
            and norm(p.reply) != norm(pair.reply)
        ]
        if not candidates:
            return None
        # Close in length (characters) and little used: length says little about which side
        # is which, and no single reply becomes the face of "off topic". Ties: pool order.
        candidates.sort(key=lambda i: (abs(len(self.pool[i].reply) - n) + 10 * self.used[i], i))
        i = rng.choice(candidates[:6])
        self.used[i] += 1
        return self.pool[i].reply


def make_pairs(pairs: list[Pair], pool: list[Pair], name: str) -> list[dict]:
    """One preference row per pair, the rejected kinds spread to their target shares."""
    makers = {
        "off_topic": OffTopic(pool),
        "truncated": make_truncated,
        "repetition": make_repetition,
        "repeat_prompt": make_repeat_prompt,
        "evasive": make_evasive,
        "word_salad": make_word_salad,
    }
    rng = rng_for(f"rejected/{name}")
    counts = {kind: 0 for kind, _ in REJECTED_KINDS}
    rows = []
    for pair in pairs:
        total = sum(counts.values()) + 1
        # The kind furthest below its target share goes first (ties: order of REJECTED_KINDS).
        order = sorted(REJECTED_KINDS, key=lambda ks: counts[ks[0]] - ks[1] * total)
        for kind, _ in order:
            rejected = makers[kind](pair, rng)
            if rejected is not None and norm(rejected) != norm(pair.reply):
                break
        else:
            continue
        counts[kind] += 1
        rows.append({
            "prompt": [{"role": "user", "content": pair.prompt}],
            "chosen": [{"role": "assistant", "content": pair.reply}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "rejected_kind": kind,
        })
    return rows


# --------------------------------------------------------------------------------------------
# Output


def sft_row(d: Dialogue) -> dict:
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(d.turns)]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def build(out: Path) -> dict[str, list[dict]]:
    dialogues = read_corpus(corpus_dir())
    split = split_keys(dialogues)

    by_split: dict[str, list[Dialogue]] = {"train": [], "eval": []}
    for d in dialogues:
        by_split[split[d.key]].append(d)

    files: dict[str, list[dict]] = {}
    sizes = {"train": (SFT_TRAIN_SIZE, RM_TRAIN_SIZE, PPO_TRAIN_SIZE),
             "eval": (SFT_EVAL_SIZE, RM_EVAL_SIZE, PPO_EVAL_SIZE)}
    for name in ("train", "eval"):
        sft_n, rm_n, ppo_n = sizes[name]
        ds = cap_per_prompt(by_split[name], lambda d: d.key, MAX_PAIRS_PER_PROMPT, f"dialogue/{name}")

        # SFT: every dialogue, multi-turn ones included.
        files[f"sft_{name}"] = [sft_row(d) for d in take(ds, sft_n, f"sft/{name}")]

        # RM: the first exchange of each dialogue; the rejected side is made from it.
        pairs = [Pair(d.category, d.turns[0], d.turns[1]) for d in ds]
        pairs = take(pairs, rm_n, f"rm/{name}")
        files[f"rm_{name}"] = make_pairs(pairs, [Pair(d.category, d.turns[0], d.turns[1]) for d in ds], name)

        # PPO: distinct prompts with a short reference reply, outside code and trivia.
        prompts: dict[str, str] = {}
        for d in ds:
            if d.category in PPO_EXCLUDED_CATEGORIES or len(d.turns[1]) > PPO_MAX_REFERENCE_CHARS:
                continue
            prompts.setdefault(d.key, d.turns[0])
        chosen = take([prompts[k] for k in sorted(prompts)], ppo_n, f"ppo/{name}")
        files[f"ppo_{name}"] = [{"prompt": [{"role": "user", "content": p}]} for p in chosen]

    write_files(out, files)
    return files


def write_files(out: Path, files: dict[str, list[dict]]) -> None:
    """Every split as out/<name>.jsonl, in sorted order."""
    out.mkdir(parents=True, exist_ok=True)
    for fname in sorted(files):
        write_jsonl(out / f"{fname}.jsonl", files[fname])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo",
                        help="output folder (default: data/demo next to this script)")
    args = parser.parse_args(argv)
    files = build(args.out)
    for fname in sorted(files):
        rows = files[fname]
        line = f"{fname}.jsonl: {len(rows)} rows"
        if fname.startswith("rm_"):
            kinds: dict[str, int] = {}
            for r in rows:
                kinds[r["rejected_kind"]] = kinds.get(r["rejected_kind"], 0) + 1
            line += " (" + ", ".join(f"{k} {kinds.get(k, 0)}" for k, _ in REJECTED_KINDS) + ")"
        print(line)


if __name__ == "__main__":
    main()
