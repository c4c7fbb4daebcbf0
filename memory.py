"""Memory: what the two people said about themselves, kept verbatim, and read back into the context.

    python memory.py build                          # the adapter's training sessions -> out/adapter/memory.jsonl
    python memory.py build --data chat.jsonl --memory out/chat_memory.jsonl
    python memory.py show                           # what it knows, per person, newest first
    python memory.py examples                       # sft.py --examples rows with the memory in the context
    python memory.py examples --recall              # ... and rows that restate a disclosure when asked

A fine-tuned model learns how two people write, and some of what they wrote about, but it holds no
record: asked twice where someone is from, it can answer "korea" once and "utah" the next time. Here a
person's self-disclosures (first-person statements about themselves, their people, places, plans,
dates and numbers) are kept word for word, by a small set of written rules (RULES, below, each tested
on examples), with speaker, time and session; nothing is paraphrased by a model and nothing leaves the
machine. A newer statement on a single-valued subject (age, home, origin, work, study) supersedes an
older one; both are kept, with their times. Reading scores the current entries by BM25 relevance to the
context's content words plus recency (as Generative Agents, Park et al. 2023,
https://arxiv.org/abs/2304.03442, sum normalised relevance and recency), puts the answer first when
the latest line asks for a single-valued subject ("where are you from again?"), and renders the best
that fit a token budget as earlier chat lines of their speaker, with a short date, placed before the
context, the best nearest it. sample.py --memory reads it.

Entries are JSONL (one per line), next to the adapter by default. Built from the training sessions
only (sft.py's split), so an evaluation on the held-out sessions never finds its own answers in it.
"""
import json
import re
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

import numpy as np

import cli
import lora
import sft
from cli import BadInput, Range, exit_on_bad_input, parse_options
from model import load_tokenizer, model_dir
from prep import BM25, TAG_LINE, load_pair, one_line, split_sessions, tag, words

COMMANDS = ("build", "show", "examples")


@dataclass
class Options:
    data: Annotated[str, "build: the chat history (default: the data the adapter was trained on)"] = ""
    adapter: Annotated[str, "build: the adapter whose training sessions (and training.json) to use; the "
                            "memory goes next to it"] = sft.ADAPTER
    memory: Annotated[str, "the memory file (default: memory.jsonl next to --adapter)"] = ""
    all_sessions: Annotated[bool, "build: every session, the held-out ones too (not for evaluation)"] = False
    top: Annotated[int, "show: entries listed per person", Range(1)] = 20
    examples: Annotated[str, "examples: the rows to write (default: memory_examples.jsonl next to --adapter)"] = ""
    budget: Annotated[int, "examples: tokens of memory lines before each context; 0 = none (the control: the "
                           "same rows and contexts without the memory)", Range(0)] = 256
    seed: Annotated[int, "examples: seed for each row's number of context messages"] = 0
    recall: Annotated[bool, "examples: add recall rows (recall_rows: asked about an earlier disclosure, its "
                            "speaker restates it from the memory)"] = False


# ---------------------------------------------------------------------------------------------------
# Writing: which sentences are self-disclosures.
#
# A sentence is kept when it is not a question and one rule matches it. Each rule is a regular
# expression over the lower-cased sentence; a rule with a subject states a single-valued attribute, so
# a newer statement on it supersedes an older one ("i live in utah" after "i live in seoul"). The others
# add facts without replacing any: a person has many statements about their mom.
I_AM = r"\bi(?:'m|’m| am|m)"
PEOPLE = (r"mom|mother|dad|father|parents|sister|brother|siblings?|family|son|daughter|kids?|grandma|grandpa|"
          r"grandparents|aunt|uncle|cousin|roommate|best friend|friends?|girlfriend|boyfriend|wife|husband|fianc[eé]e?|"
          r"partner|boss|coworkers?|dog|cat|puppy|pets?")
DATES = (r"\b(?:(?:19|20)\d\d|\d{1,2}(?:st|nd|rd|th)|monday|tuesday|wednesday|thursday|friday|saturday|sunday|january|february|march|april|may|june|"
         r"july|august|september|october|november|december|tomorrow|tonight|next week|next year|last year)\b")
# Single-valued rules are written for precision: a false "fact" there is worse than a missed one,
# because it supersedes a true one and answers a question wrongly ("some words I live by" is not a
# home, "i'm 5'8\"" not an age, "my job is so boring" not a workplace). tests/test_memory.py holds the
# written true and false examples each rule was tightened against.
AGE_END = r"(?=$|[.,!;)]| and\b| but\b| now\b| too\b| lol\b| haha\b| so\b| this\b| next\b| already\b)"
RULES = [  # (name, pattern, subject or None)
    ("age", rf"{I_AM} (\d{{1,2}})(?: years? old| yrs(?: old)?| yo| y/o)\b|{I_AM} \d{{1,2}}{AGE_END}|"
            r"\bi (?:just )?turned \d{1,2}\b|\bi(?:'ll| will) (?:be turning|turn) \d{1,2}\b", "age"),
    ("home", rf"\bi live (?:in|at|near|on)\b|{I_AM} living (?:in|at|near|on)\b|"
             r"\bmy (?:house|apartment|flat|place) is (?:in|at|near|on|by)\b", "home"),
    ("origin", rf"{I_AM} (?:originally )?from\b|\bi (?:grew up|was born|was raised) (?:in|at|on|near)\b(?! ?\d)", "origin"),
    ("work", rf"\bi work (?:at|for|as)\b|\bi work in (?!the\b)|{I_AM} working (?:at|for|as)\b|"
             r"\bmy job is (?:at|as|in)\b", "work"),
    ("study", rf"\bi (?:study|major in) (?!for\b|hard\b|a lot\b|all\b)|{I_AM} majoring in\b|"
              rf"{I_AM} studying (?!for\b|right now\b|now\b|hard\b)|\bmy major is\b", "study"),
    ("people", rf"\bmy (?:{PEOPLE})\b", None),
    ("plans", rf"{I_AM} (?:going to|gonna|planning|moving|flying|leaving for|heading to|starting)\b|\bi will\b|"
              rf"\bi'll be\b|\bwe(?:'re| are) (?:going to|moving|gonna)\b", None),
    ("has", r"\bi (?:have|'ve got|’ve got|got) (?:a|an|two|three|four|five|\d+) \w+", None),
    ("likes", r"\bmy favou?rite\b|\bi (?:love|hate|enjoy|really like)\b", None),
    ("dates", rf"\b(?:i|my|we|our|me)\b.*{DATES}", None),
]
COMPILED = [(name, re.compile(pattern), subject) for name, pattern, subject in RULES]
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")  # sentences: split after . ! or ? and a space
# A single-valued statement inside a condition or a wish is not a fact about now: "when im living on
# the road", "if i work at google", "i wish i lived in paris".
HEDGED = re.compile(r"\b(?:if|when|whenever|once|unless|until|wish|hope|would|could|might|maybe|someday|while)\b")


def disclosure(sentence: str):
    """(rule name, subject or None) of the first rule that matches a sentence, or None: not a
    self-disclosure (a question, or under 3 words, never is)."""
    s = sentence.strip().lower()
    if s.endswith("?") or len(s.split()) < 3:
        return None
    for name, pattern, subject in COMPILED:
        found = pattern.search(s)
        if found and not (subject and HEDGED.search(s[: found.start()])):
            return name, subject
    return None


@dataclass
class Entry:
    speaker: str  # as the data names them (rendered with prep.tag)
    text: str  # the disclosing sentences of one message, verbatim
    time: str  # ISO 8601, the message's
    session: int  # its session on the training side of split_sessions; -1 for a live chat
    rule: str
    subject: str | None  # a single-valued attribute it states, or None
    simulated: bool = False  # said by the simulation in sample.py --chat/--loop, not by the person
    superseded: str | None = None  # the time of the newer statement on the same subject, if any


def disclosures(message_text: str):
    """A message -> (its disclosing sentences joined, verbatim, the first matching rule, its subject),
    or None."""
    kept, first = [], None
    for sentence in SENTENCE_END.split(one_line(message_text)):
        found = disclosure(sentence)
        if found:
            kept.append(sentence.strip())
            first = first or found
    return (" ".join(kept), *first) if kept else None


def entries_of(messages, session: int = -1, simulated=False) -> list[Entry]:
    out = []
    for m in messages:
        found = disclosures(m.text)
        if found:
            text, rule, subject = found
            out.append(Entry(m.speaker, text, m.time.isoformat(), session, rule, subject, simulated))
    return out


def supersede(entries: list[Entry]) -> list[Entry]:
    """Mark each entry on a single-valued subject that a later one by the same speaker restates; all
    are kept, in time order."""
    entries = sorted(entries, key=lambda e: e.time)
    latest = {}
    for e in entries:
        e.superseded = None
    for e in entries:
        if e.subject:
            older = latest.get((e.speaker, e.subject))
            if older is not None:
                older.superseded = e.time
            latest[e.speaker, e.subject] = e
    return entries


def build(messages, gap_hours: float, val_frac: float, all_sessions=False) -> list[Entry]:
    """The memory of a history: the disclosures of its training sessions (every session with all_sessions)."""
    train, held_out = split_sessions(messages, gap_hours, val_frac)
    sessions = train + (held_out if all_sessions else [])
    return supersede([e for s, session in enumerate(sessions) for e in entries_of(session, s)])


def write_back(entries: list[Entry], speaker: str, text: str, time: datetime) -> list[Entry]:
    """A live chat's new line by the simulated person: its disclosures join the memory, marked simulated
    (the memory file is never training data: sft.py reads only --data and --examples)."""
    from prep import Message

    return supersede(entries + entries_of([Message(time, speaker, text)], simulated=True))


def save(entries: list[Entry], path) -> None:
    text = "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in entries)
    cli.write_atomically(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def load(path) -> list[Entry]:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no memory there; build one with `python memory.py build`")
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(Entry(**json.loads(line)))
            datetime.fromisoformat(entries[-1].time)
        except (json.JSONDecodeError, TypeError, ValueError):
            raise BadInput(f"{path}:{n}: not a memory entry memory.py wrote") from None
    return entries


# ---------------------------------------------------------------------------------------------------
# Reading: relevance and recency, within a token budget.

RECENCY_WEIGHT = 0.5  # relevance is scaled to [0, 1]; an entry from just now adds 0.5 more
HALF_LIFE_DAYS = 30.0  # ... and one from a month ago 0.25
BUDGET = 256  # tokens of memory lines a context gets


def days_between(now: datetime, then: datetime) -> float:
    # Times are aware (UTC) when the export says so, else naive local time; a live chat's "now" may be
    # either, so compare them as wall-clock times when only one side is aware.
    if (now.tzinfo is None) != (then.tzinfo is None):
        now, then = now.replace(tzinfo=None), then.replace(tzinfo=None)
    return (now - then).total_seconds() / 86400


def render(e: Entry) -> str:
    """An entry as an earlier chat line of its speaker, with its date: "[RIYA] i'm from korea (2019-03-02)".
    The date goes last: right after the tag, the model took it for how a message begins (with the
    memory before "where are you from again?", two of three sampled answers opened with a date)."""
    return f"{tag(e.speaker)} {e.text} ({e.time[:10]})"


def form(line: str) -> str:
    """A rendered line without its text: "[RIYA] i'm from korea (2019-03-02)" -> "[RIYA] (2019-03-02)".
    What context-aware decoding subtracts (sample.generate_ids), so that it amplifies what the memory
    says and not how its lines look."""
    head, _, date = line.rpartition(" (")
    return f"{TAG_LINE.match(head).group()} ({date}"


# Where a reply copied render's date ("... (2018-05-13)", or some of it: "2018-05"): the memory's, never
# the person's words, so a reply read with a memory ends there (sample.generate). "1990-1995" is no date.
COPIED_DATE = re.compile(r"\s*\(?(?:19|20)\d\d-[01]\d\b")


# Chat's function words: sharing "you" or "the" with the context is no reason to recall a line, and
# with them in the query every entry would be relevant and the budget always full of noise.
FUNCTION_WORDS = set("""a about again all also am an and any are as at be been but by can could did do does for from
get got had has have he her here him his how i if im in into is it its just like me more my no not now of
oh ok okay on one or our out really she so some than that the their them then there they this to too up us
very was we well were what when where which who will with would yeah yes you your""".split())


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in FUNCTION_WORDS]


def scores(entries: list[Entry], context: str, now: datetime, half_life_days=HALF_LIFE_DAYS) -> np.ndarray:
    """(N,) relevance / max relevance (BM25 of the context's content words against each entry's words)
    plus RECENCY_WEIGHT x 0.5^(age in days / half-life); 0 for an entry sharing no content word with
    the context."""
    bm25 = BM25([words(e.text) for e in entries])
    relevance = bm25.scores(content_words(context))
    if relevance.max(initial=0) <= 0:
        return np.zeros(len(entries))
    age = np.array([max(0.0, days_between(now, datetime.fromisoformat(e.time))) for e in entries])
    return np.where(relevance > 0, relevance / relevance.max() + RECENCY_WEIGHT * 0.5 ** (age / half_life_days), 0.0)


# What a question asks for: the single-valued subject whose current entry answers it. When the latest
# line asks one, the asked person's answer ranks first, whatever its words: "where are you from
# again?" shares no word with "i grew up in seoul". eval.py's consistency test asks these.
ASKS = {
    "age": r"\bhow old (?:are|r) (?:you|u)\b",
    "home": r"\bwhere (?:do|d) (?:you|u) live\b|\bwhere(?:'s| is) your (?:place|house|apartment)\b",
    "origin": r"\bwhere (?:are|r) (?:you|u) (?:originally )?from\b|\bwhere did (?:you|u) grow up\b",
    "work": r"\bwhere (?:do|d) (?:you|u) work\b|\bwhat do (?:you|u) do for (?:a )?(?:living|work)\b|"
            r"\bwhat(?:'s| is) your job\b",
    "study": r"\bwhat (?:are|r) (?:you|u) studying\b|\bwhat do (?:you|u) study\b|\bwhat(?:'s| is) your major\b",
}
ANSWER_WEIGHT = 2.0  # added to the asked answer's score: above any relevance (<= 1) plus recency (<= 0.5)


def asked(line: str) -> str | None:
    """The subject a chat line asks the other person about (ASKS), or None."""
    return next((subject for subject, pattern in ASKS.items() if re.search(pattern, line.lower())), None)


def recall(entries: list[Entry], context_lines: list[str], now: datetime, tok, budget=BUDGET) -> list[Entry]:
    """What to put before a context (render each): the current entries stated before now and not
    already in the context, best score first while their lines fit in budget tokens; returned in
    ascending score, so the best line sits nearest the context, where a small model attends most. When
    the latest line asks a subject (asked), the other person's answer ranks first (the line's own
    speaker is the one asking)."""
    context = "\n".join(context_lines)
    live = [e for e in entries if e.superseded is None and days_between(now, datetime.fromisoformat(e.time)) > 0
            and e.text not in context]
    if not live:
        return []
    s = scores(live, context, now)
    subject = asked(context_lines[-1]) if context_lines else None
    if subject:
        asker = TAG_LINE.match(context_lines[-1])
        answers = [e.subject == subject and not (asker and tag(e.speaker) == asker.group()) for e in live]
        s = s + ANSWER_WEIGHT * np.array(answers)
    chosen, used = [], 0
    for i in np.argsort(-s, kind="stable"):
        if s[i] <= 0:
            break
        cost = len(tok.encode(render(live[i]) + "\n", start=False))
        if used + cost <= budget:
            chosen.append(i)
            used += cost
    return [live[i] for i in reversed(chosen)]


# ---------------------------------------------------------------------------------------------------
# Learning to read it: the fine-tuned model never saw memory lines in training, and put before a context
# they cost it likelihood (README). These rows (sft.py --examples) are the training sessions' messages
# with the memory recalled before their context, as eval.py's (h) recalls it for a held-out session: a
# memory of the sessions before, as it stood then.

def training_rows(messages, gap_hours: float, val_frac: float, context_messages: int, tok, budget=BUDGET,
                  seed=0) -> list[dict]:
    """Every message of the training sessions as a row {"context", "speaker", "reply"}: after a random
    0..context_messages of its session's messages before it (as prep.build_examples draws them), and
    before those, the memory recalled for them from the disclosures of the earlier sessions only,
    superseded only by statements made before its session began (never its own session's, never a
    later one's)."""
    train, _ = split_sessions(messages, gap_hours, val_frac)
    everything = [e for s, session in enumerate(train) for e in entries_of(session, s)]
    rng = np.random.default_rng(seed)
    rows = []
    for s, session in enumerate(train):
        known = supersede([replace(e) for e in everything if e.session < s])  # copies: supersede marks them
        for i, target in enumerate(session):
            k = int(rng.integers(0, min(context_messages, i) + 1))
            context = [f"{tag(m.speaker)} {one_line(m.text)}" for m in session[i - k : i]]
            recalled = [render(e) for e in recall(known, context, target.time, tok, budget)] if context and budget else []
            rows.append({"context": recalled + context, "speaker": tag(target.speaker), "reply": one_line(target.text),
                         "memory_lines": len(recalled), "session": s})
    return rows


# Asked about something they said, a person restates it. In the chats such moments are rare (on the
# shipped pair 19 of 7575 rows' replies share a rare word with their memory lines), too rare for a
# small model to learn to carry a line from the memory into its reply. These rows show it: the other
# person asks about one of their earlier disclosures, the memory is recalled for that question, and the
# reply is the disclosure, verbatim. One question names its rarest word ("what was that about
# lisbon again?"); another echoes the words its rule matched, in the second person ("wait your sister
# what?", "wait you love what?"), as a question about a person's own life shares a common word with
# the answer ("where are you from?", "i'm from the bay area"). Only entries without a single-valued
# subject are asked (people, plans, likes, ...): eval.py's consistency test asks the single-valued
# ones, in other words, so it measures whether the skill carries over, not whether a fact was rehearsed.
RECALL_ASKS = ("what was that about {w} again?", "remind me about the {w} thing?",
               "wait tell me about {w} again", "you said something about {w}?")
ECHO_ASK = "wait {echo} what?"
SECOND_PERSON = {"i": "you", "i'm": "you're", "im": "you're", "i’m": "you're", "am": "are", "my": "your", "me": "you",
                 "we": "you", "we're": "you're", "our": "your", "i'll": "you'll", "i've": "you've", "i’ve": "you've"}


def echo(e: Entry) -> str | None:
    """The words e's rule matched in its text, in the second person ("my sister" -> "your sister"), or
    None when they run past 5 words (the dates rule can match a whole sentence)."""
    pattern = next(p for name, p, _ in COMPILED if name == e.rule)
    found = pattern.search(e.text.lower())
    said = found.group().split() if found else []
    return " ".join(SECOND_PERSON.get(w, w) for w in said) if 0 < len(said) <= 5 else None


def recall_rows(messages, gap_hours: float, val_frac: float, tok, budget=BUDGET, seed=0) -> list[dict]:
    """One row per training-session disclosure without a subject whose recalled memory holds it: the
    other person asks about it a day after it was said, by its rarest content word (the first of
    those; RECALL_ASKS), and in a second row by its echo (ECHO_ASK) where it has one; the reply is its
    text. Marked "recall": true, and "memory_lines" as training_rows marks them."""
    train, _ = split_sessions(messages, gap_hours, val_frac)
    everything = [e for s, session in enumerate(train) for e in entries_of(session, s)]
    people = list(dict.fromkeys(tag(m.speaker) for m in messages))
    counts = defaultdict(int)  # in how many entries each word appears: the rarest names the entry best
    for e in everything:
        for w in set(content_words(e.text)):
            counts[w] += 1
    rng = np.random.default_rng(seed)
    rows = []
    for e in everything:
        asker = next((t for t in people if t != tag(e.speaker)), None)
        ws = [w for w in content_words(e.text) if w.isalpha() and len(w) >= 3]
        if e.subject or asker is None or not ws:
            continue
        questions = [RECALL_ASKS[rng.integers(len(RECALL_ASKS))].format(w=min(ws, key=counts.get))]
        questions += [ECHO_ASK.format(echo=echo(e))] if echo(e) else []
        now = datetime.fromisoformat(e.time) + timedelta(days=1)
        known = supersede([replace(x) for x in everything if datetime.fromisoformat(x.time) < now])
        for question in questions:
            recalled = recall(known, [f"{asker} {question}"], now, tok, budget)
            if not any(x.text == e.text and x.speaker == e.speaker for x in recalled):
                continue  # the line is not in the memory this question recalls: nothing to carry over
            rows.append({"context": [render(x) for x in recalled] + [f"{asker} {question}"], "speaker": tag(e.speaker),
                         "reply": e.text, "memory_lines": len(recalled), "session": e.session, "recall": True})
    return rows


# ---------------------------------------------------------------------------------------------------

def memory_path(opts: Options) -> Path:
    return Path(opts.memory) if opts.memory else Path(opts.adapter) / "memory.jsonl"


def main():
    command, argv = cli.command(sys.argv[1:], COMMANDS, "memory.py")
    opts = parse_options(Options, argv=argv)
    path = memory_path(opts)
    if command in ("build", "examples"):
        training = (lora.read_training(opts.adapter) if Path(opts.adapter).exists() else None) or {}
        data = sft.data_settings(training, opts)
        messages, _ = load_pair(data.data)
    if command == "examples":
        if opts.recall and not opts.budget:
            raise BadInput("--recall needs a memory to recall from: not with --budget 0")
        tok = load_tokenizer(model_dir(training.get("model", sft.Options.model)))  # the budget is in its tokens
        rows = training_rows(messages, data.session_gap_hours, data.val_frac, data.context_messages, tok,
                             opts.budget, opts.seed)
        asked_rows = recall_rows(messages, data.session_gap_hours, data.val_frac, tok, opts.budget, opts.seed) \
            if opts.recall else []
        rows += asked_rows
        path = Path(opts.examples) if opts.examples else Path(opts.adapter) / "memory_examples.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        cli.write_atomically(path, lambda p: p.write_text(text, encoding="utf-8"))
        with_memory = [r["memory_lines"] for r in rows if r["memory_lines"]]
        print(f"wrote {path}: {len(rows)} rows, the training sessions' messages of {data.data}; {len(with_memory)} "
              f"with memory lines before their context (mean {np.mean(with_memory or [0]):.1f} lines)"
              f"{f', {len(asked_rows)} of them recall rows' if opts.recall else ''}. Train on them: "
              f"python sft.py --examples {path} --examples-only --init-adapter {opts.adapter} "
              f"--max-len {data.max_len + opts.budget} --out out/memory_ft{'' if opts.budget else '_control'} "
              f"(--max-len: room for the memory lines, which an example too long loses first)")
    elif command == "build":
        entries = build(messages, data.session_gap_hours, data.val_frac, opts.all_sessions)
        save(entries, path)
        per = defaultdict(int)
        for e in entries:
            per[tag(e.speaker)] += 1
        which = "all sessions" if opts.all_sessions else "the training sessions"
        print(f"wrote {path}: {len(entries)} disclosures from {which} of {data.data} "
              f"({', '.join(f'{k} {v}' for k, v in per.items())}; {sum(e.superseded is not None for e in entries)} "
              "superseded by a newer statement)")
    else:
        entries = load(path)
        by_speaker = defaultdict(list)
        for e in entries:
            by_speaker[e.speaker].append(e)
        for speaker, es in by_speaker.items():
            print(f"\n{tag(speaker)}: {len(es)} entries, newest first")
            for e in sorted(es, key=lambda e: e.time, reverse=True)[: opts.top]:
                mark = (" [simulated]" if e.simulated else "") + (f" [superseded {e.superseded[:10]}]" if e.superseded else "")
                print(f"  {e.time[:10]}  {e.rule:<7} {e.text[:100]}{mark}")


if __name__ == "__main__":
    exit_on_bad_input(main)
