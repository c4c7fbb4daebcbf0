"""prep.py from messages to training examples: pairs, cleaning, sessions, examples and their loss masks."""
import math
from collections import Counter
from datetime import datetime, timedelta

import numpy as np
import pytest

from conftest import ROOT, package_file, script
from model import BadInput, SentencePieceTokenizer
from prep import (BM25, TAG_LINE, Message, build_examples, choose_pair, clean, encode_example, read_chitchat, read_export,
                  sessions, tag)

EXPORTS = ROOT / "tests" / "data" / "exports"
T0 = datetime(2024, 3, 1, 18, 0)


def chat(*lines, start=T0, every=timedelta(minutes=1), conversation=None):
    """("Riya", "hey"), ... -> Messages one minute apart."""
    return [Message(start + i * every, who, text, conversation) for i, (who, text) in enumerate(lines)]


@pytest.fixture(scope="module", params=["mistral-sentencepiece", "smollm2-bytelevel-bpe"])
def tok(request, smol):
    if request.param == "mistral-sentencepiece":
        return SentencePieceTokenizer(package_file("mistral_common", "data", "tokenizer.model.v1"))
    return smol[1]


def test_loss_mask_covers_the_target_text_and_its_newline_only(tok):
    msgs = chat(("Riya", "hey are we still going tonight?"), ("Sam", "yes!! 8:30"), ("Riya", "see you there 🙂"))
    tags = {"Riya": "[RIYA]", "Sam": "[SAM]"}
    tokens, mask, text, cut = encode_example(tok, msgs[:2], msgs[2], tags, max_len=512)
    assert text == "[RIYA] hey are we still going tonight?\n[SAM] yes!! 8:30\n[RIYA] see you there 🙂\n"
    assert text[:cut].endswith("\n[RIYA]")
    assert tokens == tok.encode(text)  # one tokenisation of the whole example
    # Oracles: the unmasked part is exactly the prompt a user would give, and the masked part exactly
    # the reply and its end-of-turn newline, as they are tokenised inside the whole text.
    assert [t for t, m in zip(tokens, mask) if not m] == tok.encode(text[:cut])
    assert [t for t, m in zip(tokens, mask) if m] == tok.encode(" see you there 🙂\n", start=False)


def test_an_opening_message_has_no_context_and_still_a_masked_reply(tok):
    msgs = chat(("Sam", "morning!"))
    tokens, mask, text, cut = encode_example(tok, [], msgs[0], {"Sam": "[SAM]"}, max_len=512)
    assert text == "[SAM] morning!\n" and text[:cut] == "[SAM]"
    assert tok.decode([t for t, m in zip(tokens, mask) if m]).strip() == "morning!"


def test_a_long_context_drops_its_oldest_messages_to_fit(tok):
    msgs = chat(*[("Riya" if i % 2 else "Sam", f"message number {i} with some words") for i in range(9)])
    tags = {"Riya": "[RIYA]", "Sam": "[SAM]"}
    full = encode_example(tok, msgs[:8], msgs[8], tags, max_len=10_000)[0]
    tokens, mask, text, _ = encode_example(tok, msgs[:8], msgs[8], tags, max_len=len(full) - 5)
    assert len(tokens) <= len(full) - 5
    assert "number 0 " not in text and "number 7 " in text and text.endswith("number 8 with some words\n")


def test_tags_are_plain_uppercase_text():
    assert tag("Riya") == "[RIYA]" and tag("Riya Patel") == "[RIYA_PATEL]" and tag("  zoë-m ") == "[ZOË-M]"


def test_line_breaks_inside_a_message_become_spaces(tok):
    msgs = chat(("Sam", "first line\nsecond line"))
    _, _, text, _ = encode_example(tok, [], msgs[0], {"Sam": "[SAM]"}, 512)
    assert text == "[SAM] first line second line\n"


def test_sessions_split_at_silences_and_at_conversation_changes():
    a = chat(("A", "1"), ("B", "2"), conversation="c1")
    b = chat(("A", "3"), ("B", "4"), start=T0 + timedelta(hours=5), conversation="c1")
    c = chat(("A", "5"), start=T0 + timedelta(hours=5, minutes=3), conversation="c2")
    split = sessions(a + b + c, gap_hours=3)
    assert [[m.text for m in s] for s in split] == [["1", "2"], ["3", "4"], ["5"]]
    assert [[m.text for m in s] for s in sessions(a + b, gap_hours=6)] == [["1", "2", "3", "4"]]


def test_every_message_is_a_target_once_after_0_to_n_earlier_messages_of_its_session(smol):
    _, tok = smol
    days = [chat(*[("Riya" if i % 2 else "Sam", f"day {d} msg {i}") for i in range(12)],
                 start=T0 + timedelta(days=d)) for d in range(10)]
    msgs = [m for day in days for m in day]
    train, val = build_examples(msgs, tok, context_messages=4, gap_hours=3, val_frac=0.2)
    assert len(train) + len(val) == len(msgs) == 120
    contexts = Counter()
    for e in train + val:
        lines = e.text.splitlines()
        day, i = map(int, lines[-1].split("day ")[1].split(" msg "))
        assert lines[:-1] == [f"[{'RIYA' if j % 2 else 'SAM'}] day {day} msg {j}" for j in range(i - len(lines) + 1, i)]
        contexts[len(lines) - 1] += 1
    assert set(contexts) == {0, 1, 2, 3, 4}  # k varies from 0 to N (never across a session's start)


def test_validation_is_the_latest_sessions(smol):
    _, tok = smol
    msgs = [m for d in range(10) for m in chat(("Riya", f"d{d} a"), ("Sam", f"d{d} b"), start=T0 + timedelta(days=d))]
    train, val = build_examples(msgs, tok, val_frac=0.2)
    assert sorted(e.text.splitlines()[-1].split()[1] for e in val) == ["d8", "d8", "d9", "d9"]
    assert not any("d8" in e.text or "d9" in e.text for e in train)


def test_recency_weighting_halves_a_messages_weight_every_half_life(smol):
    _, tok = smol
    msgs = [m for d in range(5) for m in chat(("Riya", "x"), ("Sam", "y"), start=T0 + timedelta(days=10 * d))]
    train, _ = build_examples(msgs, tok, val_frac=0.2, recency_half_life_days=10)
    halvings = sorted({round(-math.log2(e.weight)) for e in train})  # ages 10, 20, 30, 40 days
    assert halvings == [1, 2, 3, 4]
    assert all(abs(-math.log2(e.weight) - round(-math.log2(e.weight))) < 1e-3 for e in train)


def test_one_session_is_not_enough_to_train_and_validate(smol):
    with pytest.raises(BadInput, match="only 1 session"):
        build_examples(chat(("Riya", "a"), ("Sam", "b")), smol[1])


def test_choose_pair_by_name_by_order_and_with_a_new_name():
    msgs = chat(("Riya Patel", "hi"), ("Sam", "yo"), ("Tom", "hey all"))
    kept, drops = choose_pair(msgs, me="riya patel=Riya", friend="2")
    assert [(m.speaker, m.text) for m in kept] == [("Riya", "hi"), ("Sam", "yo")]
    assert drops == Counter({"other speakers": 1})


@pytest.mark.parametrize("msgs, me, friend, says", [
    (chat(("Riya", "a"), ("Riya", "b")), None, None, "only one speaker"),
    (chat(("Riya", "a"), ("Sam", "b"), ("Tom", "c")), None, None, "choose two with --me NAME --friend NAME"),
    (chat(("Riya", "a"), ("Sam", "b")), "Riya", "Samuel", "--friend 'Samuel' is not a speaker in chat.txt; speakers: 'Riya'"),
    (chat(("Riya", "a"), ("Sam", "b")), "Riya", "riya", "two different people"),
])
def test_choose_pair_explains_what_is_wrong(msgs, me, friend, says):
    with pytest.raises(BadInput, match=says.replace("(", r"\(")):
        choose_pair(msgs, me, friend, source="chat.txt")


def test_clean_drops_simulator_text_and_keeps_repeats_and_brackets():
    msgs = chat(("Riya", "hey"), ("Sam", "yo"), ("Sam", "[1] bring snacks"), ("Riya", "[OK] got it"))
    pasted = Message(T0 + timedelta(minutes=5), "Sam", "lol look what the bot said:\n[RIYA] I love you")
    repeat = Message(msgs[0].time, "Riya", "hey")  # the same message again in the same minute: real
    kept, drops = clean(msgs + [repeat, pasted, Message(T0, "Sam", "[SAM] hi")])
    assert kept == msgs + [repeat]
    assert drops == Counter({"simulator text": 2})


@pytest.mark.parametrize("name, expected", [("Riya Patel", "[RIYA_PATEL]"), ("Рия", "[РИЯ]"), ("明", "[明]"),
                                            ("Ana-María", "[ANA-MARÍA]"), ("Ana-Mari\u0301a", "[ANA-MARÍA]"),
                                            ("  __sam!!", "[SAM]"), ("!!!", "[SPEAKER]")])
def test_tags_keep_letters_of_any_script(name, expected):
    assert tag(name) == expected and TAG_LINE.fullmatch(expected)


def test_two_people_whose_tags_collide_are_told_how_to_rename_one():
    with pytest.raises(BadInput, match=r"'Sam!' and 'sam\?' would both be \[SAM\].*--friend 'sam\?=NEW NAME'"):
        choose_pair(chat(("Sam!", "a"), ("sam?", "b")), source="chat.txt")


@pytest.mark.parametrize("me, friend, says", [("Riya", None, "--me needs --friend too"),
                                              (None, "Sam", "--friend needs --me too")])
def test_one_of_me_and_friend_alone_is_refused(me, friend, says):
    with pytest.raises(BadInput, match=says):
        choose_pair(chat(("Riya", "a"), ("Sam", "b")), me, friend, source="chat.txt")


def test_prep_cli_writes_canonical_jsonl_and_reports_every_drop(tmp_path):
    out = tmp_path / "chat.jsonl"
    run = script("prep.py", str(EXPORTS / "whatsapp_android_eu_group.txt"), "--out", str(out), "--me", "1",
                 "--friend", "2=Friend")
    assert run.returncode == 0, run.stderr
    messages, _ = read_export(out)
    assert len({m.speaker for m in messages}) == 2 and "Friend" in {m.speaker for m in messages}
    assert "dropped {" in run.stdout and f"wrote {len(messages)} messages" in run.stdout


def test_prep_cli_on_a_missing_file_prints_one_line_and_exits_2():
    run = script("prep.py", "no/such/export.txt")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "no/such/export.txt" in run.stderr


def test_the_shipped_convos_jsonl_is_chitchats_most_active_pair():
    # data/convos.jsonl must be what the README's prep command builds: the corpus, renamed, nothing else.
    shipped, drops = read_export(ROOT / "data" / "convos.jsonl")
    corpus, _ = read_chitchat(0)
    first = corpus[0].speaker
    assert not drops and len(shipped) == len(corpus) == 11431
    assert [(m.time, m.text, m.conversation) for m in shipped] == [(m.time, m.text, m.conversation) for m in corpus]
    assert [m.speaker for m in shipped] == ["Riya" if m.speaker == first else "Friend" for m in corpus]


def test_bm25_matches_a_hand_computation():
    docs = [["the", "cat", "sat"], ["the", "dog", "sat", "down"], ["a", "cat", "and", "a", "cat"]]
    scores = BM25(docs).scores(["cat", "sat", "sat", "fish"])  # repeated and unknown words add nothing
    # "cat" and "sat" are each in 2 of 3 documents: idf = ln(1 + 1.5 / 2.5) = ln 1.6. Mean length 4.
    # Each term: idf * tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * length / 4)).
    expected = [2 * math.log(1.6) * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 3 / 4)),  # cat + sat, length 3
                math.log(1.6) * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 4 / 4)),  # sat, length 4
                math.log(1.6) * 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 5 / 4))]  # cat twice, length 5
    np.testing.assert_allclose(scores, expected)
    np.testing.assert_allclose(scores, [1.05916, 0.47000, 0.62149], atol=1e-5)
