"""Seeded training samples for long-context fine-tuning, in natural language, of an exact length in any tokenizer.

Six kinds (`KINDS`), each a method of `LongContextData` that returns {"input_ids", "labels", "statement_mask",
"kind", "answer"}:

- "passkey": one fact with a number ("Note: the access code for the juniper vault is 48213.") hidden at a random
  depth in a haystack, asked for at the end ("What is the access code for the juniper vault? ..."); with
  `word_answers`, some facts have a name for an answer instead ("Amara's dog is called Brindle.").
- "multi_needle": 2-6 such facts from different templates and subjects, asked for one by its subject; the others
  are distractors (same template and another subject, or the same subject under another template).
- "kv_lookup": a list of "name: number" records (three layouts) inside the haystack; one record's number is asked.
- "variable_tracking": "Let K7 = 38210." ... "Let B12 = K7." ... chains of assignments among distractor chains;
  asked either for the value of the chain's last variable, or for every variable that holds the chain's number.
- "conversation": a multi-turn chat in the tokenizer's chat template. The user states a personal fact early on
  ("Before we start: my bike lock combination is 4721."), asks about natural text for many turns, maybe states other
  facts, and at last asks for the first one; the assistant's reply ends in the answer and the end of its turn.
- "language_modelling": a stretch of natural text, loss on every token.

The retrieval kinds are labelled (-100 elsewhere) only on the answer, which ends the sample. `statement_mask` is 1 on
the tokens of what a question may depend on (each inserted statement, distractors included; the records; the
assignments; a conversation's turns that state a fact) and 0 on the haystack, the question and every token of
language modelling: what a memory should write and what it should let pass (`extend --write-supervision`). Every
statement a question depends on ends at least `min_gap` tokens before the question (set it to the attention window W
and the answer can only come from the memory). The haystack is, per sample, natural text (the Python documentation's
training split, `hf_llama_mem.corpus.python_docs_files`), a few repeated everyday sentences, or both in alternation.
The templates, sentences and names are this module's own: neither the passkey evaluation's ("The pass key is ...",
"The grass is green.") nor RULER's ("One of the special magic numbers for ..."), so both stay held-out tests.

A sample is a pure function of its seed: `LongContextStream.batch(step)` draws sample i of step s from a generator
seeded by (seed, s, i), so a resumed run sees exactly the data an uninterrupted one would; its state is the seed and
the next step. `Mix` weighs the kinds; `LengthCurriculum` ramps the sample length over training.
"""

import hashlib
import html
import random
import re
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging

from .corpus import python_docs_files, stdlib_source_files

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_WEIGHTS",
    "KINDS",
    "LengthCurriculum",
    "LongContextData",
    "LongContextStream",
    "Mix",
    "NaturalText",
    "clean_doc_text",
    "sample_seed",
]

KINDS = ("passkey", "multi_needle", "kv_lookup", "variable_tracking", "conversation", "language_modelling")
RETRIEVAL_KINDS = KINDS[:-1]
DEFAULT_WEIGHTS = {
    "passkey": 0.25,
    "multi_needle": 0.2,
    "kv_lookup": 0.15,
    "variable_tracking": 0.15,
    "language_modelling": 0.25,
}

# Facts with a number: (statement, question, answer prefix); {s} is the subject, {n} the number. "word" subjects
# are things (the juniper vault), "person" subjects people.
FACT_TEMPLATES = (
    ("word", "Note: the access code for the {s} vault is {n}.", "What is the access code for the {s} vault?",
     "The access code for the {s} vault is"),
    ("person", "Please keep in mind that the locker assigned to {s} opens with the combination {n}.",
     "Which combination opens the locker assigned to {s}?", "The locker assigned to {s} opens with the combination"),
    ("word", "Memo from the front desk: the reservation number for the {s} room is {n}.",
     "What is the reservation number for the {s} room?", "The reservation number for the {s} room is"),
    ("word", "Important: the {s} project was filed under ticket {n}.", "Under which ticket was the {s} project filed?",
     "The {s} project was filed under ticket"),
    ("person", "The parcel for {s} is tracked with the code {n}, so do not lose it.",
     "Which code tracks the parcel for {s}?", "The parcel for {s} is tracked with the code"),
    ("person", "Write this down: {s}'s badge number is {n}.", "What is {s}'s badge number?", "{s}'s badge number is"),
    ("word", "By the way, the {s} lighthouse was repainted in the year {n}.",
     "In which year was the {s} lighthouse repainted?", "The {s} lighthouse was repainted in the year"),
    ("person", "For the record, {s} keeps the spare key in drawer number {n}.",
     "In which drawer does {s} keep the spare key?", "{s} keeps the spare key in drawer number"),
)  # fmt: skip
# Facts with a name for an answer ({n}), for `word_answers`: a memory trained on numbers alone answers every
# question in digits, also where the fact was a name.
NAME_FACT_TEMPLATES = (
    ("person", "{s}'s dog is called {n}, after an old family friend.", "What is {s}'s dog called?",
     "{s}'s dog is called"),
    ("word", "The boat moored at the {s} pier is named {n}.", "What is the boat moored at the {s} pier named?",
     "The boat moored at the {s} pier is named"),
    ("person", "{s} grew up in a small town called {n}.", "In which town did {s} grow up?",
     "{s} grew up in a small town called"),
    ("person", "Just so you know, {s}'s new neighbour is called {n}.", "What is the name of {s}'s new neighbour?",
     "{s}'s new neighbour is called"),
    ("word", "Note: the {s} hotel is run by a woman named {n}.", "Who runs the {s} hotel?",
     "The {s} hotel is run by a woman named"),
    ("person", "{s} named the new goldfish {n}.", "What did {s} name the new goldfish?", "{s} named the new goldfish"),
)  # fmt: skip
# The answers of NAME_FACT_TEMPLATES: invented names and places, none of them the chat-recall evaluation's.
NAME_ANSWERS = (
    "Brindle Calloway Dorrit Fenwick Galloway Harrowgate Ingleby Jessamy Kestrel Larkspur Marlowe Nettlefold Orrin "
    "Pellworth Quimby Rowanne Selwyn Tamarind Ulverby Varley Whitcombe Yarrowby Zennor Alderley Birchholt Corvina "
    "Dunmore Elsworth Fairleigh Gresham Hollis Juniperra Kittering Lowther Mossley Nimby Ottoline Pimms Ravensworth"
).split()
WORDS = (
    "juniper cobalt heron saffron granite willow marigold falcon copper lantern orchid basalt thistle harbor meadow "
    "cedar quartz velvet ember maple pebble sparrow tundra walnut indigo canyon beacon clover glacier hazel ivory "
    "lagoon mosaic nutmeg opal prairie raven sienna timber umber violet"
).split()
PEOPLE = (
    "Amara Bruno Celeste Dmitri Elena Farid Greta Hiroshi Ingrid Jonas Keira Luca Mireille Nadia Oskar Priya Quentin "
    "Rosa Stefan Tamsin Umar Vera Wendell Ximena Yusuf Zofia Anselm Beatrix Cyrus Delphine"
).split()
# The repeated-sentence haystack: everyday sentences, none of which states a number.
SENTENCES = (
    "A light rain fell on the harbour that morning.",
    "The baker opened the shop well before sunrise.",
    "Trains left the station every half hour.",
    "Someone was whistling an old tune in the courtyard.",
    "The clock in the hall struck the hour.",
    "Small boats rocked against the wooden pier.",
    "A cat slept on the warm windowsill.",
    "The library closed early on Fridays.",
    "Dry leaves drifted across the empty square.",
    "The kettle began to hum on the stove.",
    "Children drew pictures on the pavement with chalk.",
    "A delivery van stopped outside the post office.",
    "The river ran quietly under the stone bridge.",
    "Clouds gathered slowly over the hills.",
    "The market stalls were piled with apples and pears.",
    "A bell rang somewhere across the valley.",
    "The street lamps came on one by one.",
    "Fresh snow covered the mountain path.",
    "The ferry crossed the bay twice a day.",
    "An owl called from the edge of the forest.",
    "The gardener trimmed the hedges along the lane.",
    "Music drifted out of an open window.",
    "The fishermen mended their nets on the quay.",
    "A gust of wind rattled the shutters.",
)
QUESTION_STYLES = ("\n\nQuestion: {q}\nAnswer: {a}", "\n\n{q} {a}", "\n\nBased on the text above: {q}\n{a}")
RECORD_STYLES = (
    ("Directory of entries (name: number):\n", "{k}: {v}\n"),
    ("Reference table.\n", "- {k} -> {v}\n"),
    ("The registry lists the following entries.\n", "Entry {k} carries the number {v}.\n"),
)
RECORD_QUESTIONS = (
    ("Which number does the list give for {k}?", "The number listed for {k} is"),
    ("Look up {k} in the entries above. What is its number?", "The number of {k} is"),
)
VARIABLE_STYLES = ("Let {x} = {y}.", "Set {x} to {y}.", "Assign {y} to {x}.")
# The conversation kind's personal facts, in the user's words: (answer kind, statement, question, reply prefix).
# "number" facts take a number, "name" facts one of NAME_ANSWERS. None is a fact of the chat-recall evaluation.
CHAT_FACTS = (
    ("number", "my bike lock combination is {n}", "What is my bike lock combination?",
     "Your bike lock combination is"),
    ("number", "my library card number is {n}", "What is my library card number?", "Your library card number is"),
    ("number", "the flight I'm taking on Friday is number {n}", "Which flight am I taking on Friday?",
     "You are taking flight number"),
    ("number", "my phone extension at work is {n}", "What is my phone extension at work?",
     "Your phone extension at work is"),
    ("number", "the order I placed yesterday has the number {n}",
     "What is the number of the order I placed yesterday?", "The order you placed yesterday has the number"),
    ("number", "my seat at the concert tonight is {n}", "Which seat do I have at the concert tonight?",
     "Your seat at the concert tonight is"),
    ("number", "the alarm code at my parents' house is {n}", "What is the alarm code at my parents' house?",
     "The alarm code at your parents' house is"),
    ("number", "my membership number at the climbing club is {n}",
     "What is my membership number at the climbing club?", "Your membership number at the climbing club is"),
    ("name", "my brother's new girlfriend is called {n}", "What is my brother's new girlfriend called?",
     "Your brother's new girlfriend is called"),
    ("name", "our tortoise is named {n}", "What is our tortoise named?", "Your tortoise is named"),
    ("name", "my dentist is Dr. {n}", "What is my dentist's name?", "Your dentist is Dr."),
    ("name", "I'm reading a novel by an author called {n}", "Which author's novel am I reading?",
     "You are reading a novel by"),
    ("name", "the café where we had our first date is called {n}",
     "What is the café where we had our first date called?", "The café where you had your first date is called"),
    ("name", "my son's football coach is called {n}", "What is my son's football coach called?",
     "Your son's football coach is called"),
)  # fmt: skip
# How the user brings up a fact ({f}: the fact, lower case), asks about the text, and asks for the fact at the end.
CHAT_OPENINGS = (
    "Hello! Before we start: {f}.", "Hi there. Just so you know, {f}.", "{F}. Keep that in mind, please.",
    "Good morning! Quick note: {f}. Now, on to my questions.", "Hey. Something to remember: {f}.",
)  # fmt: skip
CHAT_ASIDES = ("Oh, and {f}.", "By the way, {f}.", "Unrelated, but {f}.")
CHAT_REQUESTS = (
    "Can you show me what the documentation says next?", "Go on, please.", "What comes after that?",
    "Could you continue with the next part?", "Thanks. And the section after it?", "Show me more of the text.",
)  # fmt: skip
CHAT_ACKNOWLEDGEMENTS = ("Noted! What would you like to know?", "Got it. How can I help?", "Sure, I'll remember.")
CHAT_QUESTIONS = ("{q}", "One more thing: {q}", "Before I go, can you remind me? {q}", "Quick question: {q} Be brief.")
CHAT_PHRASES = CHAT_OPENINGS + CHAT_ASIDES + CHAT_REQUESTS + CHAT_ACKNOWLEDGEMENTS + CHAT_QUESTIONS


def sample_seed(*parts) -> int:
    """A 64-bit seed from any parts (seed, step, index, ...), the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


_ROLE = re.compile(r":[\w:+.-]+:`(?:[^`<]*<)?([^`>]*)>?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
_VERSION_NOTE = re.compile(r"^(\s*)\.\. (versionadded|versionchanged|deprecated):: *(\S+)", re.MULTILINE)
_VERSION_WORDS = {"versionadded": "New in version", "versionchanged": "Changed in version"}
_METADATA = re.compile(
    r"^\s*\.\. (module|moduleauthor|sectionauthor|include|index|highlight|currentmodule|toctree|program|"
    r"testsetup|testcleanup|literalinclude|raw|only|rst-class|c:\w+|cmdoption|envvar|opcode|audit-event)::.*$\n?",
    re.MULTILINE,
)
_DIRECTIVE = re.compile(r"^(\s*)\.\. [\w:-]+::\s*", re.MULTILINE)
_COMMENT = re.compile(r"^\s*\.\.(?: .*)?$\n?", re.MULTILINE)
_OPTION = re.compile(r"^\s+:[\w-]+:(?: .*)?$\n?", re.MULTILINE)
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{3,}\s*$\n?", re.MULTILINE)
_TAG = re.compile(r"<(script|style)\b.*?</\1>|<[^>]+>", re.DOTALL | re.IGNORECASE)


def clean_doc_text(text: str, html_page: bool = False) -> str:
    """The prose of a documentation page: reST markup (roles, links, directive markers and options, heading
    underlines, inline literals) or HTML tags removed, blank-line runs collapsed."""
    if html_page:
        text = html.unescape(_TAG.sub("", text))
    else:
        text = _ROLE.sub(r"\1", text)
        text = _LINK.sub(r"\1", text)
        text = _METADATA.sub("", text)
        text = _OPTION.sub("", text)
        text = _VERSION_NOTE.sub(
            lambda m: f"{m[1]}{_VERSION_WORDS.get(m[2], 'Deprecated since version')} {m[3]}.", text
        )
        text = _DIRECTIVE.sub(r"\1", text)
        text = _COMMENT.sub("", text)
        text = _UNDERLINE.sub("", text)
        text = text.replace("``", "").replace("**", "")
        text = re.sub(r"^\s*::\s*$", "", text, flags=re.MULTILINE)  # a literal block's marker on its own line
        text = re.sub(r"::$", ":", text, flags=re.MULTILINE)  # "for example::" reads "for example:"
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n\n"


class NaturalText:
    """Token stretches of natural text from a list of files, drawn in proportion to file size.

    Documents are tokenized paragraph by paragraph (a paragraph ends at a blank line), as far as they are used, so
    the paragraph starts are known: a needle is inserted only there, never inside a word. `draw(n, rng)` starts at a
    random paragraph of a random document and runs on through the next documents until it has n tokens.
    """

    def __init__(self, tokenizer, files: list[str]):
        if not files:
            raise ValueError("NaturalText needs at least one file.")
        self.tokenizer = tokenizer
        self.files = list(files)
        sizes = [max(Path(f).stat().st_size, 1) for f in self.files]
        total, self.cumulative = 0, []
        for size in sizes:
            total += size
            self.cumulative.append(total)
        self._documents: dict[int, list[str]] = {}
        self._tokens: dict[tuple[int, int], list[int]] = {}

    @classmethod
    def for_split(cls, tokenizer, split: str = "train") -> "NaturalText":
        """The Python documentation's `split` ("train" or "eval"); the standard library's sources where the
        documentation is not installed."""
        try:
            files = python_docs_files(split)
        except FileNotFoundError as error:
            logger.warning(f"{error} Falling back to the standard library's source files as natural text.")
            files = stdlib_source_files(split)
        return cls(tokenizer, files)

    def paragraphs(self, index: int) -> list[str]:
        """The paragraphs of document `index` (markup cleaned), each ending in a blank line."""
        if index not in self._documents:
            path = self.files[index]
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            if path.endswith((".txt", ".html")):
                text = clean_doc_text(text, html_page=path.endswith(".html"))
            self._documents[index] = [p + "\n\n" for p in re.split(r"\n\s*\n", text) if p.strip()] or ["\n\n"]
        return self._documents[index]

    def paragraph_tokens(self, index: int, first: int, count: int) -> list[list[int]]:
        """Token ids of paragraphs first .. first + count - 1 of document `index`, tokenized once and kept."""
        paragraphs = self.paragraphs(index)
        wanted = range(first, min(first + count, len(paragraphs)))
        missing = [i for i in wanted if (index, i) not in self._tokens]
        if missing:
            encoded = self.tokenizer([paragraphs[i] for i in missing], add_special_tokens=False, verbose=False)
            self._tokens.update(zip(((index, i) for i in missing), encoded.input_ids, strict=True))
        return [self._tokens[index, i] for i in wanted]

    def draw(self, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """n tokens of text and the offsets where a paragraph starts (0 first; all < n). Only the paragraphs used
        are tokenized."""
        index = bisect_right(self.cumulative, rng.randrange(self.cumulative[-1]))
        paragraph = rng.randrange(len(self.paragraphs(index)))
        out, boundaries = [], []
        while len(out) < n:
            for ids in self.paragraph_tokens(index, paragraph, 16):
                if ids and len(out) < n:
                    boundaries.append(len(out))
                    out.extend(ids)
            paragraph += 16
            if paragraph >= len(self.paragraphs(index)):
                index, paragraph = (index + 1) % len(self.files), 0
        return out[:n], boundaries


@dataclass
class Mix:
    """The kinds of sample and their weights (normalised; zero-weight kinds are never drawn)."""

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(KINDS))
        if unknown:
            raise ValueError(f"Unknown sample kinds {unknown}; the kinds are {list(KINDS)}.")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"Mix weights must be >= 0 with a positive sum, got {self.weights}.")

    @property
    def kinds(self) -> list[str]:
        return [k for k in KINDS if self.weights.get(k, 0) > 0]

    def choose(self, rng: random.Random) -> str:
        kinds = self.kinds
        return rng.choices(kinds, weights=[self.weights[k] for k in kinds])[0]


@dataclass
class LengthCurriculum:
    """Sample length by training step: `start` tokens at step 0, rising linearly to `end` at step `ramp_steps` and
    staying there, in multiples of `multiple_of` (the end itself excepted). `ramp_steps` 0: always `end`."""

    start: int = 512
    end: int = 2048
    ramp_steps: int = 0
    multiple_of: int = 64

    def __post_init__(self):
        if not 1 <= self.start <= self.end:
            raise ValueError(f"Lengths need 1 <= start <= end, got start={self.start}, end={self.end}.")
        if self.ramp_steps < 0 or self.multiple_of < 1:
            raise ValueError(
                f"ramp_steps must be >= 0 and multiple_of >= 1, got {self.ramp_steps}, {self.multiple_of}."
            )

    def length(self, step: int) -> int:
        if self.ramp_steps == 0 or step >= self.ramp_steps:
            return self.end
        grown = (self.end - self.start) * step / self.ramp_steps
        return self.start + int(grown // self.multiple_of) * self.multiple_of


class LongContextData:
    """The generators of the six kinds for one tokenizer.

    Args:
        tokenizer: any Hugging Face tokenizer; text is encoded without special tokens, and a BOS token starts each
            sample if the tokenizer adds one by default.
        text: the natural-text source (default: the Python documentation's training split).
        min_gap: tokens that at least separate every statement a question depends on from the question.
        digits: the lengths the numbers may have (drawn uniformly per number).
        haystacks: weights of the haystack styles "natural", "repeated" and "mixed".
        chat_fraction: the share of retrieval samples put in the tokenizer's chat template (context and question as
            the user's turn, the answer as the assistant's); 0 for tokenizers without one.
        answer_end: label what ends the answer too: a period, and in the chat template the end of the assistant's
            turn. Without it nothing teaches the model to stop after the number, and a greedy reply runs on in
            digits ("7350000..." for 7350), which a whole-word match scores wrong.
        word_answers: the share of passkey samples whose fact has a name for an answer (NAME_FACT_TEMPLATES).
    """

    def __init__(
        self,
        tokenizer,
        text: NaturalText | None = None,
        min_gap: int = 0,
        digits: tuple[int, ...] = (4, 5, 6, 7),
        haystacks: dict[str, float] | None = None,
        chat_fraction: float = 0.0,
        answer_end: bool = False,
        word_answers: float = 0.0,
    ):
        self.tokenizer = tokenizer
        self.answer_end = answer_end
        if not 0.0 <= word_answers <= 1.0:
            raise ValueError(f"word_answers must be in [0, 1], got {word_answers}.")
        self.word_answers = word_answers
        self.text = text if text is not None else NaturalText.for_split(tokenizer, "train")
        self.min_gap = min_gap
        self.digits = tuple(digits)
        self.haystacks = haystacks or {"natural": 0.4, "repeated": 0.3, "mixed": 0.3}
        if min_gap < 0 or not self.digits or min(self.digits) < 1:
            raise ValueError(f"min_gap must be >= 0 and digits positive, got {min_gap}, {digits}.")
        bos = tokenizer.bos_token_id
        self.prefix = [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []
        self.turns, self.turns_end = self._turn_parts()
        self.chat_fraction = chat_fraction if self.turns is not None else 0.0
        if chat_fraction > 0 and self.turns is None:
            logger.warning("The tokenizer has no chat template: chat_fraction is ignored.")

    def describe(self) -> dict:
        """What the samples are made of, for a record of the training data."""
        files = self.text.files
        return {
            "generator": "hf_llama_mem.long_context_data",
            "text_files": len(files),
            "text_root": str(Path(files[0]).parent) if files else None,
            "min_gap": self.min_gap,
            "digits": list(self.digits),
            "haystacks": self.haystacks,
            "chat_fraction": self.chat_fraction,
            "answer_end": self.answer_end,
            "word_answers": self.word_answers,
            "fact_templates": len(FACT_TEMPLATES),
        }

    # --- building blocks --------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids

    def number(self, rng: random.Random) -> str:
        digits = rng.choice(self.digits)
        return str(rng.randrange(10 ** (digits - 1), 10**digits)) if digits > 1 else str(rng.randrange(10))

    def _turn_parts(self) -> tuple[tuple[list[int], list[int], list[int]] | None, list[int]]:
        """For multi-turn chats: the token ids before the first user turn, between a user turn and the assistant's
        reply, and between a reply and the next user turn; and the first token that ends a reply. None (and no end)
        for a tokenizer without a chat template."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            return None, []
        marks = ["\x01U1\x01", "\x01A1\x01", "\x01U2\x01", "\x01A2\x01"]
        roles = ("user", "assistant", "user", "assistant")
        text = self.tokenizer.apply_chat_template(
            [{"role": r, "content": m} for r, m in zip(roles, marks, strict=True)], tokenize=False
        )
        if not all(m in text for m in marks):
            return None, []
        head, rest = text.split(marks[0], 1)
        user_to_reply, rest = rest.split(marks[1], 1)
        reply_to_user, rest = rest.split(marks[2], 1)
        _, after = rest.split(marks[3], 1)
        parts = self.encode(head), self.encode(user_to_reply), self.encode(reply_to_user)
        return parts, self.encode(after)[:1]

    def repeated(self, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """n tokens of a few everyday sentences repeated in a cycle, and the sentence starts."""
        cycle = [self.encode(s + " ") for s in rng.sample(SENTENCES, rng.randint(3, 8))]
        out, starts, i = [], [], 0
        while len(out) < n:
            starts.append(len(out))
            out.extend(cycle[i % len(cycle)])
            i += 1
        return out[:n], [s for s in starts if s < n]

    def haystack(self, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """n tokens of filler and the offsets where a statement may be inserted (0 included)."""
        if n <= 0:
            return [], [0]
        styles = list(self.haystacks)
        style = rng.choices(styles, weights=[self.haystacks[s] for s in styles])[0]
        if style == "natural":
            return self.text.draw(n, rng)
        if style == "repeated":
            return self.repeated(n, rng)
        # Alternating parts of 64-384 tokens, each cut at its last paragraph or sentence start past its middle.
        out, starts, natural = [], [], rng.random() < 0.5
        while len(out) < n:
            size = min(n - len(out), rng.randint(64, 384))
            part, part_starts = self.text.draw(size, rng) if natural else self.repeated(size, rng)
            if len(out) + size < n:
                cut = max((s for s in part_starts if s > size // 2), default=size)
                part, part_starts = part[:cut], [s for s in part_starts if s < cut]
            starts.extend(len(out) + s for s in part_starts)
            out.extend(part)
            natural = not natural
        return out, starts

    def assemble(
        self, kind: str, statements: list[list[int]], question: str, answer_prefix: str, answer: str, length: int,
        rng: random.Random,
    ) -> dict:  # fmt: skip
        """A sample of exactly `length` tokens: haystack with `statements` inserted in order (each ending at least
        `min_gap` tokens before the question), then the question and the labelled answer."""
        # In the chat template, the context and question are the user's turn and the answer the assistant's.
        chat = self.chat_fraction > 0 and rng.random() < self.chat_fraction
        answer_ids = self.encode(" " + answer) + self.answer_end_ids(chat)
        if chat:
            head, user_to_reply, _ = self.turns
            tail = self.encode("\n\n" + question) + user_to_reply + self.encode(answer_prefix)
        else:
            head = []
            tail = self.encode(rng.choice(QUESTION_STYLES).format(q=question, a=answer_prefix))
        inserted = sum(len(s) for s in statements)
        n = length - len(self.prefix) - len(head) - inserted - len(tail) - len(answer_ids)
        if n < self.min_gap:
            raise ValueError(
                f"A {kind} sample of {length} tokens has room for {max(n, 0)} filler tokens, fewer than "
                f"min_gap={self.min_gap}: use a longer length or a smaller min_gap."
            )
        filler, starts = self.haystack(n, rng)
        limit = n - self.min_gap
        allowed = [s for s in starts if s <= limit] or [0]
        # Each statement at a uniformly random point of the allowed part, moved back to the nearest paragraph or
        # sentence start; their order is kept.
        positions = sorted(allowed[bisect_right(allowed, rng.randint(0, limit)) - 1] for _ in statements)
        ids, previous = list(self.prefix) + head, 0
        mask = [0] * len(ids)
        for position, statement in zip(positions, statements, strict=True):
            ids += filler[previous:position] + statement
            mask += [0] * (position - previous) + [1] * len(statement)
            previous = position
        ids += filler[previous:] + tail
        labels = [-100] * len(ids) + answer_ids
        ids += answer_ids
        mask += [0] * (len(ids) - len(mask))
        assert len(ids) == length, (len(ids), length)
        return {"input_ids": ids, "labels": labels, "statement_mask": mask, "kind": kind, "answer": answer}

    def room(self, length: int, question: str, answer_prefix: str, answer: str) -> int:
        """How many tokens of statements a sample of `length` tokens has room for at most: the question in its
        longest style, the answer and min_gap tokens of filler take the rest."""
        chat = self.chat_fraction > 0  # then a sample may be either, and the chat's head and ending are the longer
        head = len(self.turns[0]) + len(self.turns[1]) if chat else 0
        asked = self.encode(QUESTION_STYLES[2].format(q=question, a=answer_prefix)) + self.encode(" " + answer)
        end = self.answer_end_ids(chat)
        return length - len(self.prefix) - head - len(asked) - len(end) - self.min_gap

    def answer_end_ids(self, chat: bool) -> list[int]:
        """What `answer_end` labels after the answer: `reply_end(chat)`, or nothing without answer_end."""
        return self.reply_end(chat) if self.answer_end else []

    def reply_end(self, chat: bool) -> list[int]:
        """What ends an answer: a period, and in the chat template the end of the assistant's turn."""
        return self.encode(".") + (self.turns_end if chat else [])

    def statement(self, text: str, rng: random.Random) -> list[int]:
        """A statement as its own line or inline between sentences."""
        return self.encode(rng.choice(("\n{}\n", " {} ")).format(text))

    def fact(self, template, subject: str, number: str) -> tuple[str, str, str]:
        _, statement, question, prefix = template
        return statement.format(s=subject, n=number), question.format(s=subject), prefix.format(s=subject)

    def subject(self, template, rng: random.Random, taken: set) -> str:
        pool = WORDS if template[0] == "word" else PEOPLE
        choices = [s for s in pool if (template, s) not in taken]
        subject = rng.choice(choices)
        taken.add((template, subject))
        return subject

    # --- the kinds ----------------------------------------------------------------------------------------------

    def passkey(self, length: int, rng: random.Random) -> dict:
        # No draw at word_answers = 0, so that the samples of runs without it stay what they were.
        if self.word_answers and rng.random() < self.word_answers:
            template, answer = rng.choice(NAME_FACT_TEMPLATES), rng.choice(NAME_ANSWERS)
        else:
            template, answer = rng.choice(FACT_TEMPLATES), self.number(rng)
        statement, question, prefix = self.fact(template, self.subject(template, rng, set()), answer)
        return self.assemble("passkey", [self.statement(statement, rng)], question, prefix, answer, length, rng)

    def multi_needle(self, length: int, rng: random.Random) -> dict:
        count = rng.randint(2, 6)
        target = rng.choice(FACT_TEMPLATES)
        taken: set = set()
        facts = [(target, self.subject(target, rng, taken))]
        for _ in range(count - 1):
            if rng.random() < 0.5:  # the same template about another subject
                facts.append((target, self.subject(target, rng, taken)))
            else:  # another template, sometimes about the same subject
                other = rng.choice([t for t in FACT_TEMPLATES if t is not target])
                same = other[0] == target[0] and (other, facts[0][1]) not in taken and rng.random() < 0.5
                subject = facts[0][1] if same else self.subject(other, rng, taken)
                taken.add((other, subject))
                facts.append((other, subject))
        numbers: list[str] = []
        while len(numbers) < len(facts):
            number = self.number(rng)
            if number not in numbers:
                numbers.append(number)
        rendered = [self.fact(t, s, n) for (t, s), n in zip(facts, numbers, strict=True)]
        order = list(range(len(facts)))
        rng.shuffle(order)
        statements = [self.statement(rendered[i][0], rng) for i in order]
        _, question, prefix = rendered[0]
        room = self.room(length, question, prefix, numbers[0])
        while len(order) > 1 and sum(map(len, statements)) > room:  # the distractors that do not fit
            j = next(j for j in reversed(range(len(order))) if order[j] != 0)
            del order[j], statements[j]
        return self.assemble("multi_needle", statements, question, prefix, numbers[0], length, rng)

    def kv_lookup(self, length: int, rng: random.Random) -> dict:
        header, line = rng.choice(RECORD_STYLES)
        # The records take 15-60% of the sample, less where min_gap and the question need the room.
        per_record = len(self.encode(line.format(k="marigold-sparrow", v="1234567")))
        budget = min(int(length * rng.uniform(0.15, 0.6)), length - len(self.prefix) - self.min_gap - 96)
        count = rng.randint(2, max(2, min(budget // max(per_record, 1), 200)))
        names = set()
        while len(names) < count:
            names.add(f"{rng.choice(WORDS)}-{rng.choice(WORDS)}")
        keys = sorted(names)
        rng.shuffle(keys)
        values = [self.number(rng) for _ in keys]
        lines = [line.format(k=k, v=v) for k, v in zip(keys, values, strict=True)]
        records = self.encode("\n" + header) + [t for text in lines for t in self.encode(text)]
        asked = rng.randrange(count)
        question, prefix = rng.choice(RECORD_QUESTIONS)
        k = keys[asked]
        return self.assemble(
            "kv_lookup", [records], question.format(k=k), prefix.format(k=k), values[asked],
            length, rng,
        )  # fmt: skip

    def variable_tracking(self, length: int, rng: random.Random) -> dict:
        chains, names, numbers = [], set(), set()
        for _ in range(rng.randint(1, 3)):  # the first chain is asked about, the others distract
            number = self.number(rng)
            while number in numbers:
                number = self.number(rng)
            numbers.add(number)
            chain = []
            for _ in range(rng.randint(2, 5)):
                name = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.randint(1, 99)}"
                while name in names:
                    name = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.randint(1, 99)}"
                names.add(name)
                chain.append(name)
            chains.append((number, chain))
        # Distractor chains, then links of the asked chain, that do not fit the sample's room.
        per_statement = len(self.encode(" Assign 1234567 to W99. "))
        room = self.room(length, "Which variables hold the value 1234567?", "The variables that hold 1234567 are", "")
        while sum(len(c) for _, c in chains) * per_statement + 4 * len(chains[0][1]) > room:
            if len(chains) > 1:
                chains.pop()
            elif len(chains[0][1]) > 1:
                chains[0][1].pop()
            else:
                break
        # Statements in an order that keeps each chain's own order (a variable is assigned before it is copied).
        pending = [[(x, number if i == 0 else chain[i - 1]) for i, x in enumerate(chain)] for number, chain in chains]
        statements = []
        while any(pending):
            queue = rng.choice([q for q in pending if q])
            x, y = queue.pop(0)
            statements.append(self.statement(rng.choice(VARIABLE_STYLES).format(x=x, y=y), rng))
        number, chain = chains[0]
        if rng.random() < 0.5:
            question, prefix, answer = f"What is the value of {chain[-1]}?", f"The value of {chain[-1]} is", number
        else:
            question = f"Which variables hold the value {number}?"
            prefix, answer = f"The variables that hold {number} are", ", ".join(chain)
        return self.assemble("variable_tracking", statements, question, prefix, answer, length, rng)

    def conversation(self, length: int, rng: random.Random) -> dict:
        if self.turns is None:
            raise ValueError("The conversation kind needs a tokenizer with a chat template.")
        head, user_to_reply, reply_to_user = self.turns
        taken = rng.sample(range(len(CHAT_FACTS)), rng.choice((1, 1, 2, 3)))  # the first is asked, others distract
        answers: list[str] = []
        for index in taken:  # distinct answers, each of its fact's kind
            while True:
                answer = rng.choice(NAME_ANSWERS) if CHAT_FACTS[index][0] == "name" else self.number(rng)
                if answer not in answers:
                    break
            answers.append(answer)
        facts = [CHAT_FACTS[i][1].format(n=a) for i, a in zip(taken, answers, strict=True)]
        opening = rng.choice(CHAT_OPENINGS).format(f=facts[0], F=facts[0][0].upper() + facts[0][1:])
        _, _, question, prefix = CHAT_FACTS[taken[0]]
        answer_ids = self.encode(" " + answers[0]) + self.reply_end(chat=True)  # a reply always ends its turn
        asking = rng.choice(CHAT_QUESTIONS)
        asked = asking.format(q=question if asking.startswith("{q}") else question[0].lower() + question[1:])
        tail = reply_to_user + self.encode(asked) + user_to_reply + self.encode(prefix)
        ids = list(self.prefix) + head
        stated = self.encode(opening)
        mask = [0] * len(ids) + [1] * len(stated)
        ids += stated + user_to_reply
        ids += self.encode(rng.choice(CHAT_ACKNOWLEDGEMENTS))
        mask += [0] * (len(ids) - len(mask))
        # Filler turns (a request, then a stretch of natural text as the reply) until the sample is full; the other
        # facts are asides in random requests. The first fact then lies at least min_gap tokens before the question.
        room = length - len(ids) - len(tail) - len(answer_ids)
        requests, sizes = [], []
        asides = [rng.choice(CHAT_ASIDES).format(f=fact) for fact in facts[1:]]
        while True:
            request, aside = rng.choice(CHAT_REQUESTS), False
            if asides and rng.random() < 0.3:
                request, aside = asides.pop() + " " + request, True
            cost = len(reply_to_user) + len(self.encode(request)) + len(user_to_reply)
            if room - cost < 16:
                break
            requests.append((request, aside))
            sizes.append(min(rng.randint(48, 320), room - cost))
            room -= cost + sizes[-1]
        if not sizes or sum(sizes) + room < self.min_gap:
            raise ValueError(
                f"A conversation sample of {length} tokens has room for {sum(sizes)} tokens of turns, fewer "
                f"than min_gap={self.min_gap}: use a longer length or a smaller min_gap."
            )
        sizes[-1] += room  # what is left goes to the last reply
        for (request, aside), size in zip(requests, sizes, strict=True):
            asked_for = self.encode(request)
            mask += [0] * len(reply_to_user) + [int(aside)] * len(asked_for)
            ids += reply_to_user + asked_for + user_to_reply + self.text.draw(size, rng)[0]
            mask += [0] * (len(ids) - len(mask))
        ids += tail
        labels = [-100] * len(ids) + answer_ids
        ids += answer_ids
        mask += [0] * (len(ids) - len(mask))
        assert len(ids) == length, (len(ids), length)
        return {
            "input_ids": ids, "labels": labels, "statement_mask": mask, "kind": "conversation", "answer": answers[0],
        }  # fmt: skip

    def language_modelling(self, length: int, rng: random.Random) -> dict:
        tokens, _ = self.text.draw(length - len(self.prefix), rng)
        ids = list(self.prefix) + tokens
        return {
            "input_ids": ids, "labels": list(ids), "statement_mask": [0] * len(ids), "kind": "language_modelling",
            "answer": "",
        }  # fmt: skip

    def generate(self, kind: str, length: int, rng: random.Random | int) -> dict:
        """One sample of `kind` and exactly `length` tokens; `rng` a random.Random or a seed."""
        if kind not in KINDS:
            raise ValueError(f"Unknown sample kind {kind!r}; the kinds are {list(KINDS)}.")
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        return getattr(self, kind)(length, rng)


@dataclass
class LongContextStream:
    """Batches for training: at step s, `batch_size` samples of the curriculum's length, kinds drawn by the mix.

    Sample i of step s depends only on (seed, s, i), so any step can be rebuilt; the state (for checkpoints) is the
    seed and the next step that `next_batch` will give."""

    data: LongContextData
    mix: Mix = field(default_factory=Mix)
    curriculum: LengthCurriculum = field(default_factory=LengthCurriculum)
    batch_size: int = 4
    seed: int = 0
    next_step: int = 0

    def batch(self, step: int) -> list[dict]:
        length = self.curriculum.length(step)
        samples = []
        for index in range(self.batch_size):
            rng = random.Random(sample_seed(self.seed, step, index))
            samples.append(self.data.generate(self.mix.choose(rng), length, rng))
        return samples

    def next_batch(self) -> list[dict]:
        batch = self.batch(self.next_step)
        self.next_step += 1
        return batch

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "next_step": self.next_step,
            "batch_size": self.batch_size,
            "mix": dict(self.mix.weights),
            "curriculum": asdict(self.curriculum),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        differ = [k for k in ("seed", "batch_size", "mix", "curriculum") if state.get(k) != mine[k]]
        if differ:
            raise ValueError(f"The saved data stream differs in {differ}: saved {state}, here {mine}.")
        self.next_step = int(state["next_step"])


def as_tensors(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Samples of one length -> input_ids and labels [batch, length]."""
    return {
        "input_ids": torch.tensor([s["input_ids"] for s in samples]),
        "labels": torch.tensor([s["labels"] for s in samples]),
    }
