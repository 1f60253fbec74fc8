"""Chat recall: a multi-turn conversation in the model's chat template that asks for a fact stated many windows back.

One conversation, built as text and tokenized once (only the final answer is generated, so the task is cheap and
deterministic):

    [system prompt, if the template adds one]
    user:      "Hi! <the fact, e.g. 'By the way, my gym locker code is 4821.'> I have a few questions today."
    assistant: a fixed acknowledgement (it does not repeat the fact)
    user / assistant: scripted everyday and technical questions with fixed answers (FILLER_TURNS, in a seeded
                      order, cycled), as many as it takes to put the fact at least k * W tokens before the question
    user:      the question about the fact ("What is my gym locker code?")
    assistant: <generated greedily, max_new_tokens, stopping at EOS>

W is the model's sliding window (or `ChatRecallOptions.window`, for a model without one, such as the full-attention
baseline). The distance is counted in the model's tokens, from the end of the fact's turn to the start of the
question's turn. A conversation counts as correct when the expected answer appears in the reply as a whole word
(case-insensitive: "4821" in "Your locker code is 4821." but not in "48210"). Each of the `conversations` uses a
different fact of FACTS (the facts' order and each conversation's filler order come from the seed); every distance
k uses the same conversations, only with more filler turns. Accuracy is reported per k with its sample count.
"""

import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .common import Task, figure, require, require_positive, require_values

__all__ = [
    "ACKNOWLEDGEMENT",
    "FACTS",
    "FILLER_TURNS",
    "ChatRecallOptions",
    "ChatRecallTask",
    "Conversation",
    "Fact",
    "answer_in_reply",
    "build_conversation",
]


@dataclass(frozen=True)
class Fact:
    """A statement the user makes early on, the question that asks for it at the end, and the answer expected."""

    statement: str
    question: str
    answer: str


# Ten facts with distinct answers, none of which occurs anywhere else in the conversations (a test checks).
FACTS: tuple[Fact, ...] = (
    Fact("By the way, my gym locker code is 4821.", "What is my gym locker code?", "4821"),
    Fact("My sister's name is Ilse, and she is visiting next month.", "What is my sister's name?", "Ilse"),
    Fact("I'm staying in room 1406 of the hotel this week.", "What is my hotel room number?", "1406"),
    Fact("We just got a puppy and named him Pepperoni.", "What did we name our puppy?", "Pepperoni"),
    Fact("For the record, my employee ID is 60419.", "What is my employee ID?", "60419"),
    Fact(
        "My grandmother grew up in a small village called Tolmezzo.",
        "What is the name of the village my grandmother grew up in?",
        "Tolmezzo",
    ),
    Fact("The code for our office door is 7350.", "What is the code for our office door?", "7350"),
    Fact("My best friend from school is called Oskar.", "What is the name of my best friend from school?", "Oskar"),
    Fact("I parked in spot 233 of the garage today.", "Which parking spot did I park in today?", "233"),
    Fact("My cat's name is Mochi.", "What is my cat's name?", "Mochi"),
)

OPENING = "Hi! {statement} Anyway, I have a few questions for you today."
ACKNOWLEDGEMENT = "Hello! Thanks for letting me know. Ask me anything, I'm happy to help."
QUESTION = "Thanks, that's all my questions. One last thing: {question} Please answer briefly."

# Ordinary chat between the fact and the question: questions a user might ask, with fixed scripted answers.
FILLER_TURNS: tuple[tuple[str, str], ...] = (
    (
        "How long should I boil an egg if I want a soft yolk?",
        "About six minutes in water that is already boiling, then put it straight into cold water so it stops "
        "cooking.",
    ),
    (
        "What is the difference between a list and a tuple in Python?",
        "A list is mutable, so you can add, remove or change items after creating it. A tuple is immutable, which "
        "makes it hashable, so it can be a dictionary key.",
    ),
    (
        "Can you suggest a good stretch for a stiff lower back?",
        "Try the knee-to-chest stretch: lie on your back, pull one knee gently towards your chest, hold it for "
        "twenty to thirty seconds, then switch sides.",
    ),
    (
        "Why is the sky blue?",
        "Sunlight is scattered by the molecules in the air, and shorter blue wavelengths are scattered much more "
        "than red ones, so blue light reaches your eyes from every part of the sky.",
    ),
    (
        "How do I undo my last commit in git but keep the changes?",
        "Run git reset --soft HEAD~1. The commit is removed, and its changes stay staged so you can edit them and "
        "commit again.",
    ),
    (
        "What's a quick dinner I can make with rice and vegetables?",
        "A vegetable fried rice works well: fry garlic and onion, add chopped vegetables, then the cooked rice, a "
        "splash of soy sauce and a beaten egg.",
    ),
    (
        "How often should I water a snake plant?",
        "Only when the soil has dried out completely, which is usually every two to three weeks. Too much water is "
        "the most common way to kill one.",
    ),
    (
        "What does HTTP status code 404 mean?",
        "It means the server was reached but could not find the page or resource you asked for, often because of "
        "a broken link or a typo in the address.",
    ),
    (
        "Do you have any tips for falling asleep faster?",
        "Keep a regular bedtime, avoid screens for the last hour, keep the room cool and dark, and skip coffee in "
        "the afternoon.",
    ),
    (
        "What is the capital of Australia?",
        "The capital is Canberra. Many people guess Sydney, but Canberra was chosen as a compromise between Sydney "
        "and Melbourne.",
    ),
    (
        "How do I convert Celsius to Fahrenheit?",
        "Multiply the temperature in Celsius by nine, divide by five, then add thirty-two.",
    ),
    (
        "What's the best way to learn a new language?",
        "A little practice every day works better than long sessions once a week. Listen to native speakers, speak "
        "early even if you make mistakes, and review vocabulary with spaced repetition.",
    ),
    (
        "Why does my bread come out dense?",
        "Usually the dough did not rise long enough, the yeast was old, or there was too much flour. Let it rise "
        "until it has roughly doubled in size.",
    ),
    (
        "What is a hash table?",
        "A data structure that maps keys to values. It hashes each key to an index in an array, so looking up, "
        "adding and removing entries takes constant time on average.",
    ),
    (
        "How can I keep my phone battery healthy?",
        "Avoid letting it run down to zero often, keep it away from heat, and if your phone offers it, turn on the "
        "setting that stops charging at around eighty percent.",
    ),
    (
        "What should I pack for a weekend hiking trip?",
        "Good shoes, layers of clothing, a rain jacket, plenty of water, snacks, a map, a small first aid kit and a "
        "headlamp in case you are out after dark.",
    ),
    (
        "What is the difference between weather and climate?",
        "Weather is what the atmosphere does over hours or days. Climate is the average pattern of weather in a "
        "place over many years.",
    ),
    (
        "How do I center a div in CSS?",
        "Make its parent a flex container with display: flex, then set justify-content: center and align-items: "
        "center on the parent.",
    ),
    (
        "Is it better to rent or buy a home?",
        "It depends on how long you plan to stay, the local prices and your savings. Buying tends to pay off only "
        "if you stay for several years.",
    ),
    (
        "Can you recommend a classic novel to read?",
        "Pride and Prejudice by Jane Austen is a great choice: witty, warm and easy to get into, even two centuries "
        "after it was written.",
    ),
    (
        "What causes the seasons on Earth?",
        "The tilt of the Earth's axis. As the planet orbits the sun, each hemisphere leans towards it for part of "
        "the year, which gives longer days and more direct sunlight.",
    ),
    (
        "How do I make a good cup of tea?",
        "Use freshly boiled water, let black tea steep for three to five minutes, then remove the leaves or the bag "
        "so it does not turn bitter.",
    ),
    (
        "What is recursion in programming?",
        "A function that calls itself on a smaller version of the same problem, with a base case that stops the "
        "calls. Walking a tree or computing a factorial are classic examples.",
    ),
    (
        "How do I get rid of fruit flies in the kitchen?",
        "Put out a small bowl of vinegar with a drop of dish soap, and take out ripe fruit and old rubbish so they "
        "have nothing to breed on.",
    ),
    (
        "Why do cats purr?",
        "Mostly to show they are content, but cats also purr when they are stressed or hurt, and the vibration may "
        "help them calm down and heal.",
    ),
    (
        "What's a polite way to decline a meeting invitation?",
        "Thank the organiser, say briefly that you cannot make it, and offer an alternative, such as reading the "
        "notes afterwards or meeting at another time.",
    ),
    (
        "How does compound interest work?",
        "You earn interest not only on the money you put in but also on the interest it has already earned, so the "
        "balance grows faster every year.",
    ),
    (
        "What is the tallest mountain in the world?",
        "Mount Everest, in the Himalayas on the border between Nepal and China, is the highest above sea level.",
    ),
    (
        "How can I stop procrastinating?",
        "Break the task into very small steps, start with just five minutes, and remove distractions such as your "
        "phone while you work.",
    ),
    (
        "What is the difference between RAM and storage?",
        "RAM is fast, temporary memory that holds what the computer is working on right now. Storage, such as an "
        "SSD, keeps your files even when the power is off.",
    ),
    (
        "How do I clean a cast iron pan?",
        "Rinse it with hot water and scrub with a brush, dry it completely on the stove, then wipe a thin layer of "
        "oil over it so it does not rust.",
    ),
    (
        "Why do leaves change colour in autumn?",
        "As the days get shorter, trees stop making green chlorophyll, and the yellow and orange pigments that were "
        "there all along start to show.",
    ),
)


def answer_in_reply(answer: str, reply: str) -> bool:
    """Whether `answer` occurs in `reply` as a whole word, ignoring case."""
    pattern = rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])"
    return re.search(pattern, reply, flags=re.IGNORECASE) is not None


@dataclass(frozen=True)
class Conversation:
    """One built conversation. `input_ids` is the whole prompt (the chat template applied, the assistant's turn
    opened); the fact's turn ends at token `fact_end` and the question's turn starts at `question_start`, so the fact
    lies `gap = question_start - fact_end` tokens before the question."""

    fact: Fact
    windows_back: int
    messages: tuple[dict, ...]
    text: str
    input_ids: tuple[int, ...]
    fact_end: int
    question_start: int

    @property
    def gap(self) -> int:
        return self.question_start - self.fact_end

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


def chat_text(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    """The template's text already holds its special tokens: none are added."""
    return tokenizer(text, add_special_tokens=False).input_ids


def build_conversation(tokenizer, fact: Fact, windows_back: int, window: int, filler_order: list[int]) -> Conversation:
    """The conversation that asks for `fact` with at least windows_back * window tokens between the end of the
    fact's turn and the start of the question's turn; filler turns are taken in `filler_order` (indices into
    FILLER_TURNS), cycled."""
    require(getattr(tokenizer, "chat_template", None) is not None, "The chat-recall task needs a chat template.")
    target = windows_back * window
    opening = (
        {"role": "user", "content": OPENING.format(statement=fact.statement)},
        {"role": "assistant", "content": ACKNOWLEDGEMENT},
    )
    question = {"role": "user", "content": QUESTION.format(question=fact.question[0].lower() + fact.question[1:])}
    fact_ids = encode(tokenizer, chat_text(tokenizer, opening[:1], add_generation_prompt=False))
    opening_tokens = len(encode(tokenizer, chat_text(tokenizer, opening, add_generation_prompt=False)))
    # A filler pair's length in the chat, estimated as its text's tokens plus the template's tokens around a pair
    # (measured once); the loop below measures the whole history again, so the estimate only sets the step.
    turn_tokens: dict[int, int] = {}
    first = [{"role": "user", "content": FILLER_TURNS[0][0]}, {"role": "assistant", "content": FILLER_TURNS[0][1]}]
    with_first = len(encode(tokenizer, chat_text(tokenizer, opening + tuple(first), add_generation_prompt=False)))
    overhead = max(with_first - opening_tokens - sum(len(encode(tokenizer, text)) for text in FILLER_TURNS[0]), 0)
    filler: list[dict] = []
    while True:
        history = opening + tuple(filler)
        history_ids = encode(tokenizer, chat_text(tokenizer, history, add_generation_prompt=False))
        gap = len(history_ids) - len(fact_ids)
        if gap >= target:
            break
        needed = target - gap
        while needed > 0:
            index = filler_order[(len(filler) // 2) % len(filler_order)]
            if index not in turn_tokens:
                turn_tokens[index] = overhead + sum(len(encode(tokenizer, text)) for text in FILLER_TURNS[index])
            user, reply = FILLER_TURNS[index]
            filler += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            needed -= turn_tokens[index]
    messages = history + (question,)
    text = chat_text(tokenizer, messages, add_generation_prompt=True)
    ids = encode(tokenizer, text)
    # The template must tokenize its turns independently (special tokens between them, as every chat template has),
    # so that the positions measured on the prefixes are positions in the whole prompt.
    require(
        ids[: len(fact_ids)] == fact_ids and ids[: len(history_ids)] == history_ids,
        "The chat template's turns do not tokenize as prefixes of the whole conversation: cannot place the fact.",
    )
    return Conversation(fact, windows_back, messages, text, tuple(ids), len(fact_ids), len(history_ids))


@dataclass(frozen=True)
class ChatRecallOptions:
    """`conversations` (each with a different fact, at most len(FACTS)), the distances `windows_back` (k: the fact
    at least k * W tokens before the question), the reply's `max_new_tokens`, and `window` (W; None: the model's
    sliding_window, and a model without one needs it set)."""

    conversations: int = 10
    windows_back: tuple[int, ...] = (4, 8, 16)
    max_new_tokens: int = 16
    window: int | None = None

    def __post_init__(self):
        require_positive("conversations", self.conversations)
        require(
            self.conversations <= len(FACTS),
            f"conversations must be at most {len(FACTS)} (one fact each), got {self.conversations!r}.",
        )
        require_values("windows_back", self.windows_back, 1)
        require(
            all(isinstance(k, int) for k in self.windows_back),
            f"windows_back must be integers, got {self.windows_back!r}.",
        )
        require(
            len(set(self.windows_back)) == len(self.windows_back),
            f"windows_back must not repeat a value, got {self.windows_back!r}.",
        )
        require_positive("max_new_tokens", self.max_new_tokens)
        require(
            self.window is None or (isinstance(self.window, int) and self.window >= 1),
            f"window must be a positive integer, got {self.window!r}.",
        )


class ChatRecallTask(Task):
    name = "chat-recall"

    def __init__(self, options: ChatRecallOptions | None = None):
        self.options = options or ChatRecallOptions()

    def window(self, model) -> int:
        window = self.options.window or getattr(model.config, "sliding_window", None)
        require(
            window is not None,
            "This model has no sliding window: set the window W that the distances count in (--window).",
        )
        return window

    def plan(self, seed: int) -> list[tuple[Fact, list[int]]]:
        """(fact, filler order) of each conversation: a function of the seed alone."""
        rng = random.Random(f"chat-recall/{seed}")
        facts = rng.sample(range(len(FACTS)), self.options.conversations)
        return [(FACTS[i], rng.sample(range(len(FILLER_TURNS)), len(FILLER_TURNS))) for i in facts]

    def conversations(self, tokenizer, window: int, seed: int = 0) -> list[Conversation]:
        """Every conversation the task asks, for each distance in order, then each fact."""
        plan = self.plan(seed)
        return [
            build_conversation(tokenizer, fact, k, window, order)
            for k in self.options.windows_back
            for fact, order in plan
        ]

    def check(self, model, tokenizer) -> None:
        require(tokenizer is not None, "The chat-recall task reads text: it needs a tokenizer.")
        require(
            getattr(tokenizer, "chat_template", None) is not None,
            "The chat-recall task needs a tokenizer with a chat template (an instruction-tuned model's).",
        )
        window = self.window(model)
        longest = build_conversation(tokenizer, FACTS[0], max(self.options.windows_back), window, [0])
        largest = max(longest.input_ids)
        require(
            largest < model.config.vocab_size,
            f"The tokenizer gives ids up to {largest}, beyond this model's vocabulary of {model.config.vocab_size}: "
            "is it the model's own tokenizer?",
        )

    def reply(self, model, tokenizer, conversation: Conversation) -> str:
        """The greedy reply to the whole conversation (one generate() call: the history is read as one prefill)."""
        ids = torch.tensor([conversation.input_ids], device=model.device)
        stops = [tokenizer.eos_token_id, model.generation_config.eos_token_id]
        stops = sorted({t for stop in stops if stop is not None for t in (stop if isinstance(stop, list) else [stop])})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.options.max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=stops or None,
            pad_token_id=pad,
        )
        return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()

    @torch.no_grad()
    def evaluate(self, model, tokenizer=None, *, seed: int = 0, progress: bool = True) -> dict:
        self.check(model, tokenizer)
        window = self.window(model)
        was_training = model.training
        model.eval()
        records = []
        conversations = self.conversations(tokenizer, window, seed)
        for conversation in tqdm(conversations, desc="chat-recall", disable=not progress):
            reply = self.reply(model, tokenizer, conversation)
            records.append(
                {
                    "windows_back": conversation.windows_back,
                    "fact": conversation.fact.statement,
                    "question": conversation.question,
                    "expected": conversation.fact.answer,
                    "reply": reply,
                    "correct": answer_in_reply(conversation.fact.answer, reply),
                    "gap_tokens": conversation.gap,
                    "prompt_tokens": len(conversation.input_ids),
                }
            )
        model.train(was_training)
        by_k = {k: [r for r in records if r["windows_back"] == k] for k in self.options.windows_back}
        return {
            "task": self.name,
            "window": window,
            "windows_back": list(self.options.windows_back),
            "samples": self.options.conversations,
            "accuracy": sum(r["correct"] for r in records) / len(records),
            "by_windows_back": {str(k): sum(r["correct"] for r in rs) / len(rs) for k, rs in by_k.items()},
            "correct": {str(k): sum(r["correct"] for r in rs) for k, rs in by_k.items()},
            "mean_prompt_tokens": {str(k): sum(r["prompt_tokens"] for r in rs) / len(rs) for k, rs in by_k.items()},
            "max_new_tokens": self.options.max_new_tokens,
            "conversations": records,
        }

    def table(self, results: dict) -> str:
        window = results["window"]
        rows = ["| fact windows back | tokens back (>=) | prompt tokens (mean) | correct | accuracy |"]
        rows.append("|---|---|---|---|---|")
        for k in results["windows_back"]:
            key = str(k)
            rows.append(
                f"| {k} | {k * window} | {results['mean_prompt_tokens'][key]:.0f} "
                f"| {results['correct'][key]}/{results['samples']} | {results['by_windows_back'][key]:.2f} |"
            )
        return "\n".join(rows)

    def card_rows(self, results: dict) -> list[dict]:
        return [
            {"setting": f"fact {k} windows back (W {results['window']})", "metric": "accuracy", "value": accuracy}
            for k, accuracy in results["by_windows_back"].items()
        ]

    def plot(self, results: dict, path: str, title: str = "") -> None:
        labels = (f"fact distance (windows of W = {results['window']} tokens)", "chat recall accuracy")
        with figure(path, title or self.name, *labels, log2_x=True, ylim=(-0.05, 1.05)) as axis:
            ks = results["windows_back"]
            values = [results["by_windows_back"][str(k)] for k in ks]
            axis.plot(ks, values, marker="o", label=f"{results['samples']} conversations each")
