"""memory.py: the rules on written disclosures and non-disclosures, supersession by time, retrieval
ranked as by hand within the token budget, built from training sessions only, simulated lines marked."""
import json
from datetime import datetime, timedelta

import numpy as np
import pytest

import memory
from memory import Entry
from prep import BM25, load_pair, split_sessions, words
from conftest import script

DISCLOSURES = {  # sentence -> the rule that should keep it
    "i'm 24 years old": "age",
    "I am 31 and still no idea what I'm doing": "age",
    "i live in provo with two roommates": "home",
    "I'm originally from korea": "origin",
    "i grew up in seoul": "origin",
    "I work at a bakery on weekends": "work",
    "i'm studying nursing at byu": "study",
    "my sister just had a baby": "people",
    "My boyfriend is so kind and thoughtful": "people",
    "im going to lose wifi so ill be back in a few": "plans",
    "I have two cats and a fish": "has",
    "my favorite food is kimchi": "likes",
    "my favorite is my mom's kimchi": "people",  # the first rule that matches names it
    "we leave for hawaii on friday": "dates",
    "i just turned 21 yesterday": "age",
    "I work in marketing downtown": "work",
    "my major is biology": "study",
    "im studying to be a nurse": "study",
    "my apartment is near campus": "home",
}
NOT_DISCLOSURES = [
    "where are you from?",  # a question
    "oh my god that is hilarious",  # "my" without a person or thing of theirs
    "lol same",  # too short
    "that sounds like a lot of fun",  # nothing first-person
    "i'm 5 min away",  # a number that is not an age
    "you should come visit sometime",
    "do you have a dog?",
    # Single-valued look-alikes, each once kept as a false fact on the shipped data (reworded here):
    "some words that i live by are simple",  # a motto, not a home
    "i realize i'm 5'8\" 135lbs and cannot dunk",  # a height, not an age
    "my job is so boring",  # not where they work
    "i work in the mornings mostly",  # when, not where
    "i'm studying for my chem test",  # an errand, not a field
    "if i work at google we can hang out",  # a condition, not a fact
    "i am 5 minutes late",
]


@pytest.mark.parametrize("sentence, rule", DISCLOSURES.items())
def test_self_disclosures_are_kept_by_their_rule(sentence, rule):
    assert memory.disclosure(sentence)[0] == rule


@pytest.mark.parametrize("sentence", NOT_DISCLOSURES)
def test_questions_small_talk_and_other_people_are_not_kept(sentence):
    assert memory.disclosure(sentence) is None


def test_only_the_disclosing_sentences_of_a_message_are_kept_verbatim():
    text, rule, subject = memory.disclosures("Haha yeah. I live in Utah now! What about you?")
    assert (text, rule, subject) == ("I live in Utah now!", "home", "home")
    assert memory.disclosures("haha yeah. what about you?") is None


def at(day):
    return datetime(2020, 1, 1) + timedelta(days=day)


def entry(text, day, speaker="Riya", subject=None, **kw):
    return Entry(speaker, text, at(day).isoformat(), 0, kw.pop("rule", "x"), subject, **kw)


def test_a_newer_statement_on_the_same_subject_supersedes_the_older_and_both_are_kept():
    entries = memory.supersede([entry("i live in utah", 9, subject="home"), entry("i live in seoul", 1, subject="home"),
                                entry("i live in lima", 5, speaker="Friend", subject="home"),
                                entry("my mom is visiting", 2), entry("my mom cooks", 3)])
    by_text = {e.text: e for e in entries}
    assert [e.time for e in entries] == sorted(e.time for e in entries)  # time order
    assert by_text["i live in seoul"].superseded == at(9).isoformat()
    assert by_text["i live in utah"].superseded is None
    assert by_text["i live in lima"].superseded is None  # another person's home
    assert by_text["my mom is visiting"].superseded is None  # subjectless facts never replace each other


class WordTokenizer:
    def encode(self, text, start=True):
        return text.split()


def test_recall_ranks_by_relevance_plus_recency_as_by_hand_and_honours_the_budget():
    entries = [entry("i love korean food so much", 0), entry("my sister lives in korea", 20),
               entry("my dog is named biscuit", 25), entry("i went to korea last year for food", 28)]
    now, context = at(30), "[FRIEND] do you miss korea and the food"
    bm25 = BM25([words(e.text) for e in entries])
    rel = bm25.scores([w for w in words(context) if w not in memory.FUNCTION_WORDS])
    age = np.array([30, 10, 5, 2])
    by_hand = np.where(rel > 0, rel / rel.max() + memory.RECENCY_WEIGHT * 0.5 ** (age / memory.HALF_LIFE_DAYS), 0)
    np.testing.assert_allclose(memory.scores(entries, context, now), by_hand)
    assert by_hand[2] == 0  # biscuit shares no word with the context
    tok = WordTokenizer()
    cost = lambda e: len(tok.encode(memory.render(e) + "\n"))
    lines = lambda **kw: [memory.render(e) for e in memory.recall(entries, [context], tok=tok, **kw)]
    ascending = [memory.render(entries[i]) for i in np.argsort(by_hand) if by_hand[i] > 0]
    assert lines(now=now, budget=10_000) == ascending  # the relevant ones, the best last (nearest the context)
    best_first = [entries[i] for i in np.argsort(-by_hand) if by_hand[i] > 0]
    budget = cost(best_first[0]) + cost(best_first[1]) - 1  # room for the best, not the second too
    kept = lines(now=now, budget=budget)
    assert memory.render(best_first[0]) in kept and memory.render(best_first[1]) not in kept
    assert sum(len(tok.encode(line + "\n")) for line in kept) <= budget
    assert memory.recall(entries, [context], at(10), tok) == [entries[0]]  # nothing from the future
    assert memory.render(entries[1]) == "[RIYA] my sister lives in korea (2020-01-21)"


def test_a_question_on_a_subject_recalls_the_other_persons_answer_first_and_last():
    entries = [entry("i grew up in seoul", 0, subject="origin", rule="origin"),
               entry("i'm from lima", 1, speaker="Friend", subject="origin", rule="origin"),
               entry("my sister is from again and again", 29)]  # shares only function words with the question
    tok, now = WordTokenizer(), at(30)
    question = "[FRIEND] where are you from again?"
    assert memory.asked(question) == "origin"
    assert memory.scores(entries, question, now)[0] == 0  # no shared word: BM25 alone would never recall it
    recalled = memory.recall(entries, [question], now, tok)
    assert recalled[-1] == entries[0]  # Riya's answer, nearest the question
    assert memory.recall(entries, ["[RIYA] where are you from again?"], now, tok)[-1] == entries[1]  # asked the other way
    budget = len(tok.encode(memory.render(entries[0]) + "\n"))
    assert memory.recall(entries, [question], now, tok, budget=budget) == [entries[0]]  # first within the budget


def test_a_lines_form_is_its_tag_and_date_without_its_text():
    e = memory.Entry("Riya", "i'm from korea (the south)", "2019-03-02T10:00:00", 0, "origin", "origin")
    assert memory.render(e) == "[RIYA] i'm from korea (the south) (2019-03-02)"
    assert memory.form(memory.render(e)) == "[RIYA] (2019-03-02)"


def test_the_consistency_tests_questions_are_recognised_as_asking_their_subject():
    import eval as ev

    assert {subject: memory.asked(q) for subject, q in ev.QUESTIONS.items()} == {s: s for s in ev.QUESTIONS}


def test_the_memory_holds_training_sessions_only(small_chat):
    messages, _ = load_pair(small_chat)
    entries = memory.build(messages, 3.0, 0.5)
    train, held_out = split_sessions(messages, 3.0, 0.5)
    held = {(m.speaker, m.time.isoformat()) for s in held_out for m in s}
    assert entries and not {(e.speaker, e.time) for e in entries} & held
    assert {(e.speaker, e.time) for e in memory.build(messages, 3.0, 0.5, all_sessions=True)} & held


def test_simulated_disclosures_are_marked_and_saved_apart_from_the_data(small_chat, tmp_path):
    messages, _ = load_pair(small_chat)
    entries = memory.write_back(memory.build(messages, 3.0, 0.5), "Friend", "lol ok. i live in denver now",
                                datetime(2030, 1, 1))
    new = [e for e in entries if e.simulated]
    assert [e.text for e in new] == ["i live in denver now"] and new[0].session == -1
    path = tmp_path / "memory.jsonl"
    memory.save(entries, path)
    assert memory.load(path) == entries
    assert load_pair(small_chat)[0] == messages  # the history itself is untouched


def test_cli_builds_next_to_the_adapter_and_shows_it(tiny_adapter, tmp_path):
    path = tmp_path / "m.jsonl"
    out = script("memory.py", "build", "--adapter", str(tiny_adapter), "--memory", str(path))
    assert out.returncode == 0, out.stderr
    assert "disclosures from the training sessions" in out.stdout and path.exists()
    shown = script("memory.py", "show", "--memory", str(path), "--top", "2")
    assert shown.returncode == 0 and "[RIYA]" in shown.stdout and "newest first" in shown.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\"speaker\": 1}\n")
    out = script("memory.py", "show", "--memory", str(bad))
    assert out.returncode == 2 and out.stderr.startswith(f"error: {bad}:1:") and len(out.stderr.splitlines()) == 1


def test_sample_reads_the_memory_before_the_context_and_writes_simulated_lines_back(small_chat, tmp_path):
    from types import SimpleNamespace

    import sample

    path = tmp_path / "memory.jsonl"
    messages, _ = load_pair(small_chat)
    memory.save(memory.build(messages, 3.0, 0.5), path)
    tok = WordTokenizer()
    opts = SimpleNamespace(memory_file=str(path))
    fit, remember = sample.remembering(opts, SimpleNamespace(adapter=""), tok, budget=400, context_messages=8)
    entries = memory.load(path)
    about = entries[0]  # something a context can ask about
    context = [f"[RIYA] tell me about {' '.join(words(about.text)[-4:])}"]
    recalled, seen = fit(context)
    assert seen == context and recalled  # the memory's lines, and the context apart from them
    assert all(line.split("] ", 1)[1].rsplit(" (", 1)[0] in {e.text for e in entries} for line in recalled)
    assert sum(len(tok.encode(l + "\n")) for l in recalled) <= 200  # half the prompt's budget at most
    remember("[FRIEND] haha. i live in denver now")
    remember("[FRIEND] ok sounds good")  # no disclosure: nothing written
    after = memory.load(path)
    assert len(after) == len(entries) + 1
    new = next(e for e in after if e.simulated)
    assert (new.speaker, new.text, new.session) == ("Friend", "i live in denver now", -1)


def test_cli_sample_with_memory_runs(tiny_adapter, tmp_path):
    path = tmp_path / "m.jsonl"
    assert script("memory.py", "build", "--adapter", str(tiny_adapter), "--memory", str(path)).returncode == 0
    out = script("sample.py", "--adapter", str(tiny_adapter), "--speaker", "FRIEND", "--prompt", "[RIYA] how is your mom?",
                 "--memory", "--memory-file", str(path), "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[FRIEND] ")
    contrasted = script("sample.py", "--adapter", str(tiny_adapter), "--speaker", "FRIEND", "--prompt",
                        "[RIYA] how is your mom?", "--memory", "--memory-file", str(path), "--memory-contrast", "1",
                        "--max-new-tokens", "4", "--n", "2")
    assert contrasted.returncode == 0 and contrasted.stdout.count("[FRIEND] ") == 2, contrasted.stderr
    missing = script("sample.py", "--adapter", str(tiny_adapter), "--memory", "--memory-file", str(tmp_path / "none"))
    assert missing.returncode == 2 and "no memory there" in missing.stderr


def test_training_rows_recall_only_earlier_sessions_as_the_memory_stood_then(tmp_path):
    """memory.py examples: each training message after its context, the memory before it holding the
    earlier sessions' disclosures only, superseded only by what was said before its session."""
    import sft
    from prep import Message

    day = lambda d, h=0: datetime(2020, 1, 1) + timedelta(days=d, hours=h)
    sessions = [[("Riya", "i live in seoul and i love seoul food"), ("Friend", "nice")],
                [("Friend", "how is seoul"), ("Riya", "i live in busan now, seoul got old")],
                [("Friend", "do you still like seoul food"), ("Riya", "yes")],
                [("Friend", "later"), ("Riya", "bye")]]  # the held-out session (val_frac 0.25)
    messages = [Message(day(d, h), who, text) for d, s in enumerate(sessions) for h, (who, text) in enumerate(s)]
    tok = WordTokenizer()
    rows = memory.training_rows(messages, 3.0, 0.25, 8, tok, seed=0)  # seed 0 draws 1 context message below
    assert [r["reply"] for r in rows] == [text for s in sessions[:3] for _, text in s]  # training sessions only
    by_reply = {r["reply"]: r for r in rows}
    # session 1: the memory holds session 0's "i live in seoul ..." (relevant to "how is seoul"), not its own
    # session's newer statement, which supersedes it only later
    row = by_reply["i live in busan now, seoul got old"]
    assert row["context"] == ["[RIYA] i live in seoul and i love seoul food (2020-01-01)", "[FRIEND] how is seoul"]
    # session 2: the busan statement (session 1) superseded the seoul one, so only busan is current
    row = by_reply["yes"]
    assert row["context"] == ["[RIYA] i live in busan now, seoul got old (2020-01-02)",
                              "[FRIEND] do you still like seoul food"]
    assert all(r["context"] == [] for r in rows if r["session"] == 0 and r["reply"] == sessions[0][0][1])
    # budget 0, the control: the same rows and contexts, no memory lines
    control = memory.training_rows(messages, 3.0, 0.25, 8, tok, budget=0, seed=0)
    assert [r["context"][r["memory_lines"]:] for r in rows] == [r["context"] for r in control]
    assert not any(r["memory_lines"] for r in control) and any(r["memory_lines"] for r in rows)
    # and sft.py trains on them as written: loss on the reply and its newline
    examples = sft.examples_from_rows(rows, tok, 512)
    assert examples[len(sessions[0]) + 1].text.endswith("[RIYA] i live in busan now, seoul got old\n")


def test_recall_rows_ask_about_a_subjectless_disclosure_and_answer_it_verbatim_from_the_memory():
    """memory.py examples --recall: the other person asks about an earlier disclosure, by its rarest
    content word and by an echo of its rule's words, the memory recalled for the question holds it, the
    reply is the disclosure; never a single-valued subject (the consistency test's), never a held-out
    session's."""
    import sft
    from prep import Message

    day = lambda d, h=0: datetime(2020, 1, 1) + timedelta(days=d, hours=h)
    sessions = [[("Riya", "my sister moved to lisbon, lisbon is far"), ("Riya", "i live in seoul"), ("Friend", "ok")],
                [("Friend", "i love pottery and lisbon"), ("Riya", "cool")],
                [("Riya", "my mom is visiting"), ("Friend", "bye")]]  # the held-out session (val_frac 0.34)
    messages = [Message(day(d, h), who, text) for d, s in enumerate(sessions) for h, (who, text) in enumerate(s)]
    rows = memory.recall_rows(messages, 3.0, 0.34, WordTokenizer(), seed=0)
    sister, pottery = "my sister moved to lisbon, lisbon is far", "i love pottery and lisbon"
    assert [(r["speaker"], r["reply"]) for r in rows] == [("[RIYA]", sister)] * 2 + [("[FRIEND]", pottery)] * 2
    # "lisbon" is in both entries, so each is asked about the first word only it has, then by its echo
    assert rows[0]["context"][-1] in {"[FRIEND] " + q.format(w="sister") for q in memory.RECALL_ASKS}
    assert rows[1]["context"][-1] == "[FRIEND] wait your sister what?"
    assert rows[2]["context"][-1] in {"[RIYA] " + q.format(w="love") for q in memory.RECALL_ASKS}
    assert rows[3]["context"][-1] == "[RIYA] wait you love what?"
    assert rows[0]["context"][:-1] == rows[1]["context"][:-1] == [f"[RIYA] {sister} (2020-01-01)"]
    assert all(len(r["context"]) - 1 == r["memory_lines"] and r["recall"] for r in rows)
    examples = sft.examples_from_rows(rows, WordTokenizer(), 512)
    assert examples[0].text.endswith(f"[RIYA] {sister}\n")


def test_an_echo_puts_the_rules_words_in_the_second_person():
    assert memory.echo(entry("I'm going to paris in june", 0, rule="plans")) == "you're going to"
    assert memory.echo(entry("we are moving to a farm", 0, rule="plans")) == "you are moving"
    assert memory.echo(entry("i have two cats and a dog", 0, rule="has")) == "you have two cats"
    assert memory.echo(entry("so my cousin and i went skiing with our friends on december 3rd", 0, rule="dates")) is None


def test_cli_writes_memory_examples_sft_reads(tiny_adapter, tmp_path):
    import sft

    path = tmp_path / "rows.jsonl"
    out = script("memory.py", "examples", "--adapter", str(tiny_adapter), "--examples", str(path))
    assert out.returncode == 0, out.stderr
    assert "with memory lines before their context" in out.stdout and "--examples-only" in out.stdout
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert any(r["memory_lines"] for r in rows)

    class Tok:  # sft.rows_as_examples only checks and tokenises
        def encode(self, text, start=True):
            return text.split()
    assert len(sft.rows_as_examples(path, Tok(), 512)) == len(rows)
    out = script("memory.py", "examples", "--adapter", str(tiny_adapter), "--examples", str(path), "--recall",
                 "--budget", "0")
    assert out.returncode == 2 and out.stderr.strip() == "error: --recall needs a memory to recall from: not with --budget 0"
