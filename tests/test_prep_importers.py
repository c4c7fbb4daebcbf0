"""prep.py's importers on small invented exports of every format (tests/data/exports), good and broken."""
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

import prep
from conftest import package_file
from model import BadInput
from prep import Message, chitchat_pairs, read_chitchat, read_export, write_jsonl

EXPORTS = Path(__file__).resolve().parent / "data" / "exports"
UTC = timezone.utc
# Every well-formed sample, with the format its name or keys must be detected as.
SAMPLES = {
    "whatsapp_android_us.txt": "whatsapp",
    "whatsapp_android_eu_group.txt": "whatsapp",
    "whatsapp_ios_eu.txt": "whatsapp",
    "whatsapp_ios_us.txt": "whatsapp",
    "whatsapp_dots_undecidable.txt": "whatsapp",
    "telegram_result.json": "telegram",
    "discord_channel.json": "discord",
    "messenger_remidubois_1234567890": "messenger",
    "messenger_remidubois_1234567890/message_2.json": "messenger",
    "chat_export.csv": "csv",
    "chat_unix_times.csv": "csv",
    "chat.jsonl": "jsonl",
}


def read(name, fmt=None):
    return read_export(EXPORTS / name, fmt)


def by_text(messages, text):
    (found,) = [m for m in messages if m.text == text]
    return found


# WhatsApp


def test_whatsapp_android_12_hour_clock_reads_month_first_dates():
    messages, dropped = read("whatsapp_android_us.txt")
    assert messages[0] == Message(datetime(2019, 12, 28, 18, 41), "Riya", "hey! are you still coming on the 31st?")
    assert by_text(messages, "found it under the bed lol").time == datetime(2019, 12, 29, 0, 4)  # 12:04 AM
    assert messages[-1] == Message(datetime(2020, 1, 1, 1, 2), "Sam", "happy new year 🥳 best night")
    assert len(messages) == 13
    assert dropped == Counter(system=2, media=2, deleted=2)


def test_whatsapp_messages_in_the_same_minute_keep_their_order():
    messages, _ = read("whatsapp_android_us.txt")
    assert [m.text for m in messages[1:3]] == ["yes!! wouldn't miss it", "what should I bring"]


def test_whatsapp_multiline_messages_keep_their_lines():
    android, _ = read("whatsapp_android_us.txt")
    plan = by_text(android, "ok so the plan:\n- 8pm at mine\n- fireworks at the pier\n- pancakes after")
    assert plan.speaker == "Riya"
    group, _ = read("whatsapp_android_eu_group.txt")
    hike = by_text(group, "saturday plan:\n\nmeet 7:30 at the station\nbring water + layers")  # a blank line inside
    assert hike.time == datetime(2020, 2, 14, 18, 47)
    ios, _ = read("whatsapp_ios_us.txt")
    assert by_text(ios, "I'm crying\nok not crying\nok a bit").speaker == "Sam Okafor"


def test_whatsapp_edited_marker_is_stripped_from_the_text():
    android, _ = read("whatsapp_android_us.txt")
    assert by_text(android, "love it. pancakes are non negotiable").time == datetime(2019, 12, 29, 12, 32)
    ios, _ = read("whatsapp_ios_eu.txt")
    assert by_text(ios, "ok calling now").speaker == "Riya Kapoor"


def test_whatsapp_android_caption_after_an_attachment_is_kept():
    messages, _ = read("whatsapp_android_us.txt")
    assert by_text(messages, "look what I got for tomorrow 🎆").time == datetime(2019, 12, 30, 9, 21)
    assert not [m for m in messages if "file attached" in m.text or "omitted" in m.text]


def test_whatsapp_android_24_hour_group_chat_drops_system_lines():
    messages, dropped = read("whatsapp_android_eu_group.txt")
    assert {m.speaker for m in messages} == {"Riya Kapoor", "Sam Okafor", "Tomás Ruiz"}
    # "01/03/2020" is the 1st of March: "14/02/2020" earlier in the file shows the day comes first.
    assert by_text(messages, "still on for the 14th?") == Message(datetime(2020, 3, 1, 8, 0), "Sam Okafor",
                                                                  "still on for the 14th?")
    assert len(messages) == 12
    assert dropped == Counter(system=5, media=2, deleted=1)


def test_whatsapp_ios_notes_marked_with_lrm_and_placeholders_are_dropped():
    messages, dropped = read("whatsapp_ios_eu.txt")
    assert messages[0] == Message(datetime(2021, 5, 3, 19, 2, 11), "Riya Kapoor", "did you see the match??")
    assert not [m for m in messages if "\u200e" in m.text or "omitted" in m.text or "Missed" in m.text]
    assert len(messages) == 12
    assert dropped == Counter(system=2, media=6, deleted=2)


def test_whatsapp_ios_lowercase_a_m_and_p_m_are_read():
    messages, dropped = read("whatsapp_ios_us.txt")
    assert messages[0] == Message(datetime(2022, 4, 16, 23, 58, 2), "Riya Kapoor", "are you up")
    assert by_text(messages, "happy birthday!!! 🎂").time == datetime(2022, 4, 17, 0, 0, 5)
    assert by_text(messages, "best cake of my life").time == datetime(2022, 4, 17, 21, 13, 30)
    assert len(messages) == 12
    assert dropped == Counter(media=2)


def test_whatsapp_undecidable_date_order_is_read_day_first():
    messages, dropped = read("whatsapp_dots_undecidable.txt")
    assert messages[0] == Message(datetime(2020, 1, 3, 21, 5), "Riya", "back from the holidays?")
    assert messages[-1] == Message(datetime(2020, 1, 11, 12, 0), "Riya", "deal")
    assert len(messages) == 12
    assert dropped == Counter(empty=1)


def test_whatsapp_times_are_naive_local_times():
    messages, _ = read("whatsapp_ios_eu.txt")
    assert all(m.time.tzinfo is None for m in messages)


@pytest.mark.parametrize("line, time", [
    ("31-12-2019 21:05 - Riya: hi", datetime(2019, 12, 31, 21, 5)),
    ("2019-12-31 21:05 - Riya: hi", datetime(2019, 12, 31, 21, 5)),
    ("31.12.19, 21.05 - Riya: hi", datetime(2019, 12, 31, 21, 5)),
    ("12/31/2019, 9:05\u202fPM - Riya: hi", datetime(2019, 12, 31, 21, 5)),
    ("12/31/19, 12:05 a.m. - Riya: hi", datetime(2019, 12, 31, 0, 5)),
    ("\u200e[31/12/2019, 9:05:33 pm] Riya: hi", datetime(2019, 12, 31, 21, 5, 33)),
    ("[31/12/2019 21:05:33] Riya: hi", datetime(2019, 12, 31, 21, 5, 33)),
])
def test_whatsapp_reads_timestamps_of_many_locales(tmp_path, line, time):
    path = tmp_path / "chat.txt"
    path.write_text(line + "\n", encoding="utf-8")
    assert read_export(path) == ([Message(time, "Riya", "hi")], Counter())


def test_whatsapp_text_before_the_first_timestamp_names_the_line():
    with pytest.raises(BadInput, match=r"bad_whatsapp_text_before_timestamp\.txt:2: not a WhatsApp chat line"):
        read("bad_whatsapp_text_before_timestamp.txt")


def test_whatsapp_file_mixing_day_first_and_month_first_is_refused():
    with pytest.raises(BadInput, match=r"bad_whatsapp_mixed_date_order\.txt mixes date orders: line 1 .* line 4"):
        read("bad_whatsapp_mixed_date_order.txt")


def test_whatsapp_impossible_date_names_the_line():
    with pytest.raises(BadInput, match=r"bad_whatsapp_invalid_date\.txt:3: not a valid date"):
        read("bad_whatsapp_invalid_date.txt")


def test_export_with_only_system_lines_says_it_has_no_messages():
    with pytest.raises(BadInput, match=r"bad_whatsapp_only_system\.txt has no messages \(dropped: 3 system\)"):
        read("bad_whatsapp_only_system.txt")


# Telegram


def test_telegram_joins_text_entities_and_keeps_captions():
    messages, dropped = read("telegram_result.json")
    assert messages[0] == Message(datetime(2023, 3, 30, 21, 16, 2, tzinfo=UTC), "Riya Kapoor", "did you land?")
    texts = [m.text for m in messages]
    assert "the hotel is https://example.com/hotel-sol if you want to look" in texts
    assert "jealous is an understatement" in texts
    assert by_text(messages, "view from the room 🌅").speaker == "Sam Okafor"  # a photo with a caption
    assert not [t for t in texts if "Tasca" in t]  # the forwarded channel post
    assert len(messages) == 12
    assert dropped == Counter(system=2, media=4, forwarded=1)


def test_telegram_uses_unix_time_and_falls_back_to_the_local_date(tmp_path):
    data = json.loads((EXPORTS / "telegram_result.json").read_text(encoding="utf-8"))
    raw = data["messages"][1]
    assert raw["date"] == "2023-03-30T23:16:02"  # the exporting computer's clock, UTC+2
    assert read("telegram_result.json")[0][0].time == datetime(2023, 3, 30, 21, 16, 2, tzinfo=UTC)
    for m in data["messages"]:  # older exports have no date_unixtime
        m.pop("date_unixtime")
    (tmp_path / "result.json").write_text(json.dumps(data), encoding="utf-8")
    assert read_export(tmp_path / "result.json")[0][0].time == datetime(2023, 3, 30, 23, 16, 2)


def test_telegram_whole_account_export_asks_for_one_chat():
    with pytest.raises(BadInput, match=r"bad_telegram_full_account\.json is a whole-account .* export one chat"):
        read("bad_telegram_full_account.json")


def test_telegram_message_without_a_date_is_named():
    with pytest.raises(BadInput, match=r'bad_telegram_missing_date\.json: message 3 has no "date"'):
        read("bad_telegram_missing_date.json")


# Discord


def test_discord_speaker_is_the_nickname_else_the_name_and_times_are_utc():
    messages, dropped = read("discord_channel.json")
    # 18:02:11.123+02:00 on the exporting computer.
    first = Message(datetime(2023, 4, 1, 16, 2, 11, 123000, tzinfo=UTC), "Riya", "welcome to the server!!")
    assert messages[0] == first
    assert {m.speaker for m in messages} == {"Riya", "samokafor", "Tomás"}
    assert by_text(messages, "in. what do I need").speaker == "samokafor"  # a Reply is a message
    assert len(messages) == 12
    assert dropped == Counter(system=2, media=2, bot=1, call=1, empty=1)


def test_discord_message_without_an_author_is_named():
    with pytest.raises(BadInput, match=r'bad_discord_missing_author\.json: message 2 has no "author"'):
        read("bad_discord_missing_author.json")


# Messenger


def test_messenger_folder_merges_its_files_in_time_order():
    messages, dropped = read("messenger_remidubois_1234567890")
    assert messages[0] == Message(datetime(2022, 6, 10, 19, 30, 0, 250000, tzinfo=UTC), "Rémi Dubois",
                                  "salut Zoë ! tu es rentrée ?")  # from message_2.json, the older file
    assert messages[-1] == Message(datetime(2022, 6, 12, 19, 43, 0, 250000, tzinfo=UTC), "Rémi Dubois", "hâte !")
    assert by_text(messages, "la terrasse ☀️").speaker == "Zoë Martin"  # a photo with a caption
    assert len(messages) == 12
    assert dropped == Counter(media=3, reaction=1, call=1, deleted=1)


def test_messenger_mojibake_is_repaired_in_names_and_emoji():
    raw = json.loads((EXPORTS / "messenger_remidubois_1234567890" / "message_2.json").read_text(encoding="utf-8"))
    assert raw["participants"][0]["name"] == "RÃ©mi Dubois"  # the sample really is written like Facebook's
    messages, _ = read("messenger_remidubois_1234567890")
    assert {m.speaker for m in messages} == {"Rémi Dubois", "Zoë Martin"}
    assert by_text(messages, "incroyable. je veux y retourner 😂").speaker == "Zoë Martin"


def test_messenger_text_that_is_already_correct_is_left_alone(tmp_path):
    thread = {"participants": [{"name": "Zoë Martin"}], "title": "Zoë Martin",
              "messages": [{"sender_name": "Zoë Martin", "timestamp_ms": 1655062920000,
                            "content": "à samedi ☀️"}]}
    (tmp_path / "message_1.json").write_text(json.dumps(thread, ensure_ascii=False), encoding="utf-8")
    messages, _ = read_export(tmp_path)
    assert messages == [Message(datetime(2022, 6, 12, 19, 42, tzinfo=UTC), "Zoë Martin", "à samedi ☀️")]


def test_messenger_single_file_is_read_on_its_own():
    messages, dropped = read("messenger_remidubois_1234567890/message_2.json")
    assert [m.text for m in messages] == [
        "salut Zoë ! tu es rentrée ?",
        "oui, hier soir 😴",
        "et alors, c'était comment Lisbonne ?",
        "incroyable. je veux y retourner 😂",
    ]
    assert dropped == Counter(media=1, reaction=1, call=1)


def test_messenger_message_without_a_timestamp_is_named():
    with pytest.raises(BadInput, match=r'bad_messenger_missing_timestamp\.json: message 1 has no "timestamp_ms"'):
        read("bad_messenger_missing_timestamp.json")


def test_messenger_folder_without_message_files_is_refused(tmp_path):
    with pytest.raises(BadInput, match=r"has no message_\*\.json files"):
        read_export(tmp_path)


# CSV


def test_csv_columns_are_found_by_alias_in_any_case():
    messages, dropped = read("chat_export.csv")  # Timestamp,Sender,Message
    assert messages[0] == Message(datetime(2023, 6, 1, 8, 0, tzinfo=UTC), "Riya", "morning! running late")
    # 10:02+02:00 is 08:02 UTC, so it sorts between 08:01:30Z and 08:05Z.
    assert messages[2] == Message(datetime(2023, 6, 1, 8, 2, tzinfo=UTC), "Riya", "ok, get me a flat white")
    assert messages[3].text == "got it\nalso a croissant?"
    assert messages[4].text == 'yes please, the "almond" one'
    assert len(messages) == 12
    assert dropped == Counter(empty=2)


def test_csv_reads_unix_seconds_and_conversations():
    messages, dropped = read("chat_unix_times.csv")  # Date,Author,Body,Conversation
    assert messages[0] == Message(datetime(2023, 6, 15, 8, 0, tzinfo=UTC), "Riya", "did you finish the book?",
                                  "book-club-june")
    half_second = by_text(messages, "ok finished. that ending!!")  # 1686902400.5
    assert half_second.time == datetime(2023, 6, 16, 8, 0, 0, 500000, tzinfo=UTC)
    assert [m.conversation for m in messages].count("book-club-july") == 4
    assert messages[-1] == Message(datetime(2023, 6, 24, 9, 47, 40, tzinfo=UTC), "Riya", "WHAT congrats!!!")
    assert len(messages) == 13
    assert dropped == Counter()


def test_csv_without_a_speaker_column_lists_the_aliases():
    with pytest.raises(BadInput, match=r"bad_csv_missing_speaker\.csv has no speaker column; .*"
                                       r"speaker, sender, author, from, name"):
        read("bad_csv_missing_speaker.csv")


def test_csv_unreadable_time_names_the_line():
    # Line 5, not 4: the quoted message above it spans two lines.
    with pytest.raises(BadInput, match=r"bad_csv_bad_time\.csv:5: can't read the time 'yesterday at 8'"):
        read("bad_csv_bad_time.csv")


# JSONL


def test_jsonl_reads_canonical_lines():
    messages, dropped = read("chat.jsonl")
    assert messages[0] == Message(datetime(2023, 7, 1, 19, 0, tzinfo=UTC), "Riya", "movie tonight?", "2023-07-01")
    assert messages[4] == Message(datetime(2023, 7, 1, 19, 4, tzinfo=UTC), "Riya", "8:30 showing?\nor 9:15",
                                  "2023-07-01")
    assert messages[-1] == Message(datetime(2023, 7, 3, 12, 2, tzinfo=UTC), "Riya", "tomorrow ✔")
    assert len(messages) == 12
    assert dropped == Counter(empty=1)


@pytest.mark.parametrize("name", SAMPLES)
def test_write_jsonl_then_read_export_round_trips_exactly(tmp_path, name):
    messages, _ = read(name)
    write_jsonl(messages, tmp_path / "out.jsonl")
    again, dropped = read_export(tmp_path / "out.jsonl")
    assert again == messages
    assert [m.time.tzinfo for m in again] == [m.time.tzinfo for m in messages]  # == alone ignores the zone
    assert dropped == Counter()


def test_write_jsonl_writes_readable_unicode_and_omits_a_missing_conversation(tmp_path):
    write_jsonl([Message(datetime(2023, 7, 3, 12, 2, tzinfo=UTC), "Zoë", "tomorrow ✔")], tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == (
        '{"time": "2023-07-03T12:02:00+00:00", "speaker": "Zoë", "text": "tomorrow ✔"}\n')


def test_jsonl_invalid_json_names_the_line():
    with pytest.raises(BadInput, match=r"bad_jsonl_invalid\.jsonl:3: not valid JSON \("):
        read("bad_jsonl_invalid.jsonl")


def test_jsonl_missing_key_names_the_line():
    with pytest.raises(BadInput, match=r'bad_jsonl_missing_text\.jsonl:2: missing "text"'):
        read("bad_jsonl_missing_text.jsonl")


def test_jsonl_wrong_type_names_the_line():
    with pytest.raises(BadInput, match=r'bad_jsonl_wrong_type\.jsonl:4: "speaker" must be a string'):
        read("bad_jsonl_wrong_type.jsonl")


def test_times_with_and_without_a_zone_in_one_file_are_refused():
    with pytest.raises(BadInput, match=r"bad_jsonl_mixed_time_zones\.jsonl mixes times with and without a timezone"):
        read("bad_jsonl_mixed_time_zones.jsonl")


# Detection and errors shared by every format


@pytest.mark.parametrize("name, fmt", SAMPLES.items())
def test_format_is_detected_from_the_name_or_the_keys(name, fmt):
    assert read(name) == read(name, fmt)


def test_undetectable_json_lists_the_supported_formats():
    with pytest.raises(BadInput, match=r"can't tell which chat export .*bad_unknown\.json is; .*"
                                       r"whatsapp, telegram, discord, messenger, csv, jsonl, chitchat"):
        read("bad_unknown.json")


def test_missing_path_is_named():
    with pytest.raises(BadInput, match=r"nowhere\.txt does not exist"):
        read("nowhere.txt")


def test_empty_file_says_it_is_empty():
    with pytest.raises(BadInput, match=r"bad_empty\.txt is empty"):
        read("bad_empty.txt")


def test_unknown_format_name_is_refused():
    with pytest.raises(BadInput, match=r"unknown format 'signal'"):
        read("chat.jsonl", "signal")


def test_file_that_is_not_utf8_is_refused(tmp_path):
    (tmp_path / "chat.txt").write_bytes("31/12/2019, 21:05 - Zoë: salut".encode("latin-1"))
    with pytest.raises(BadInput, match=r"chat\.txt is not UTF-8 text"):
        read_export(tmp_path / "chat.txt")


# The chitchat corpus


@pytest.fixture(scope="module")
def top_pair():
    return chitchat_pairs()[0], read_chitchat(0)


def test_chitchat_most_active_pair_has_62_conversations_and_11431_messages(top_pair):
    (pair, n_conversations, n_messages), (messages, dropped) = top_pair
    assert len(pair) == 2 and (n_conversations, n_messages) == (62, 11431)  # as REFERENCE.md counts them
    assert {m.speaker for m in messages} == pair
    assert len({m.conversation for m in messages}) == 62
    assert len(messages) + sum(dropped.values()) == 11431


def test_chitchat_pairs_are_two_person_pairs_most_messages_first():
    pairs = chitchat_pairs()
    assert len(pairs) == 2307  # REFERENCE.md
    assert all(len(pair) == 2 for pair, _, _ in pairs)
    assert [n for _, _, n in pairs] == sorted((n for _, _, n in pairs), reverse=True)


def test_read_chitchat_flattens_each_conversation_in_order(top_pair):
    _, (messages, _) = top_pair
    corpus = json.loads(package_file("chitchat_dataset", "dataset.json").read_text(encoding="utf-8"))
    key = messages[0].conversation
    flat = [m for group in corpus[key]["messages"] for m in group if m["text"].strip()]
    ours = [(m.speaker, m.text) for m in messages if m.conversation == key]
    assert ours == [(m["sender"], m["text"]) for m in flat]
    assert messages[0].time == datetime.fromisoformat(flat[0]["timestamp"])
    assert messages[0].time.tzinfo == UTC
    assert [m.time for m in messages] == sorted(m.time for m in messages)


def test_read_export_of_chitchat_is_the_top_pair(top_pair):
    _, (messages, dropped) = top_pair
    assert read_export("chitchat") == (messages, dropped)


def test_read_chitchat_rank_past_the_last_pair_is_refused():
    with pytest.raises(BadInput, match=r"--pair 2307 is not a chitchat pair"):
        read_chitchat(2307)


def test_chitchat_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(prep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BadInput, match=r"pip install chitchat-dataset==0\.9\.0"):
        chitchat_pairs()
