"""Chat logs -> training data: every export people have becomes one list of messages, then examples.

    python prep.py chat.txt --me Riya --friend Sam                # WhatsApp -> data/chat.jsonl
    python prep.py result.json --me "Riya Patel=Riya" --friend Sam   # Telegram, renaming a speaker
    python prep.py chitchat --me 1=Riya --friend 2=Friend --out data/convos.jsonl   # the public corpus

Reads WhatsApp .txt, Telegram Desktop result.json, DiscordChatExporter JSON, Facebook/Instagram
Messenger message_*.json (a file or its folder), CSV, our canonical JSONL, and the chitchat-dataset
corpus. Writes canonical JSONL, one message per line: {"time": ISO-8601, "speaker", "text"}
(+ "conversation"). sft.py turns such a file into training examples with build_examples() below.
"""
import argparse
import csv
import importlib.util
import io
import json
import random
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cli import BadInput, Parser, exit_on_bad_input, progress, read_json, write_atomically

# Importers: every chat export becomes one list of Messages plus a Counter of what was dropped and why.
# Nothing is skipped silently: a photo, a "Missed voice call" or a deleted message is counted under a
# short reason ("media", "system", "deleted", "empty", "call", "reaction", "forwarded", "bot"), so a
# user can see how much of their history never reached training.

FORMATS = ("whatsapp", "telegram", "discord", "messenger", "csv", "jsonl", "chitchat")


@dataclass(frozen=True)
class Message:
    time: datetime  # aware UTC when the export says so (unix times, "Z", offsets); else naive local time
    speaker: str
    text: str
    conversation: str | None = None


def read_export(path: str | Path, fmt: str | None = None) -> tuple[list[Message], Counter]:
    """Any supported export -> (messages sorted by time (stable), Counter of dropped messages by reason)."""
    if fmt is not None and fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}; supported formats: {', '.join(FORMATS)}")
    if fmt == "chitchat" or (fmt is None and str(path) == "chitchat"):
        return read_chitchat()
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    if path.is_dir() and fmt not in (None, "messenger"):
        raise BadInput(f"{path} is a folder; only a Messenger export is read from a folder")
    if path.is_file() and path.stat().st_size == 0:
        raise BadInput(f"{path} is empty")
    fmt = fmt or _detect_format(path)
    readers = {"whatsapp": _read_whatsapp, "telegram": _read_telegram, "discord": _read_discord,
               "messenger": _read_messenger, "csv": _read_csv, "jsonl": _read_jsonl}
    messages, dropped = readers[fmt](path)
    if not messages:
        counts = ", ".join(f"{n} {reason}" for reason, n in dropped.most_common())
        raise BadInput(f"{path} has no messages" + (f" (dropped: {counts})" if dropped else ""))
    # An aware time can't be compared with a naive one (there is no right order between "21:05 UTC"
    # and "21:05 somewhere"), so a CSV or JSONL file must use one kind throughout.
    if len({m.time.tzinfo is None for m in messages}) > 1:
        raise BadInput(f"{path} mixes times with and without a timezone; "
                       f"give every time a zone (e.g. a trailing Z) or none")
    messages.sort(key=lambda m: m.time)  # stable: messages sent in the same second keep the export's order
    return messages, dropped


def write_jsonl(messages, path) -> None:
    """Messages -> the canonical JSONL that read_export(path) reads back exactly (written atomically)."""
    rows = []
    for m in messages:
        row = {"time": m.time.isoformat(), "speaker": m.speaker, "text": m.text}
        if m.conversation is not None:
            row["conversation"] = m.conversation
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomically(path, lambda tmp: Path(tmp).write_text("".join(rows), encoding="utf-8"))


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "messenger"
    suffix = path.suffix.lower()
    if suffix in (".txt", ".csv", ".jsonl"):
        return {".txt": "whatsapp", ".csv": "csv", ".jsonl": "jsonl"}[suffix]
    if suffix == ".json":
        # The three JSON exporters are told apart by their keys. The reader parses the file again;
        # chat exports are small next to anything a training run reads.
        data = read_json(path)
        if isinstance(data, dict):
            items = data.get("messages") if isinstance(data.get("messages"), list) else []
            items = [m for m in items if isinstance(m, dict)]
            if "guild" in data and "channel" in data and any("author" in m for m in items):
                return "discord"
            if "participants" in data and any("sender_name" in m for m in items):
                return "messenger"
            # "chats" is Telegram's whole-account export; its reader says what to export instead.
            if "chats" in data or any("from" in m and "type" in m for m in items):
                return "telegram"
    raise BadInput(f"can't tell which chat export {path} is; supported: a WhatsApp .txt, a Telegram, Discord "
                   f"or Messenger .json (or Messenger folder), .csv, .jsonl, or 'chitchat'; or name the "
                   f"format ({', '.join(FORMATS)})")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: some exporters (and Excel) start with a BOM
    except UnicodeDecodeError:
        raise BadInput(f"{path} is not UTF-8 text") from None


def _json_messages(path: Path, data, exporter: str) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise BadInput(f'{path} is not a {exporter} export: it has no "messages" list')
    for i, m in enumerate(data["messages"], 1):
        if not isinstance(m, dict):
            raise BadInput(f"{path}: message {i} is not a JSON object but {type(m).__name__}")
    return data["messages"]


_MISSING = object()
_KINDS = {str: "text", int: "a number", float: "a number", dict: "an object", list: "a list", type(None): "null"}


def _get(m: dict, key: str, kinds, where: str, default=_MISSING):
    """m[key], which must be one of kinds (a type or a tuple of them); else one sentence naming where
    and key. A JSON export's fields are checked where they are read, so a null or a number where text
    belongs is an error that says so, not a traceback or a message silently changed."""
    if key not in m:
        if default is _MISSING:
            raise BadInput(f'{where} has no "{key}"')
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    value = m[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(dict.fromkeys(_KINDS.get(k, k.__name__) for k in kinds))
        raise BadInput(f'{where}: "{key}" must be {expected}, not {_KINDS.get(type(value), type(value).__name__)}')
    return value


def _unix_time(seconds, where: str, key: str) -> datetime:
    try:
        return datetime.fromtimestamp(float(seconds), timezone.utc)
    except (OverflowError, OSError, ValueError):  # inf, NaN, text, or too far from 1970 for the platform
        raise BadInput(f'{where}: "{key}" {seconds!r} is not a time') from None


def _parse_time(text: str) -> datetime:
    """ISO-8601 ("2023-04-01T18:02:11", "...Z", "...+02:00") or unix seconds; ValueError if neither."""
    try:
        seconds = float(text)  # tried first: fromisoformat would read "20230401" as a date, not seconds
    except ValueError:
        time = datetime.fromisoformat(text)  # Python 3.11+ also reads a trailing "Z"
        return time.astimezone(timezone.utc) if time.tzinfo else time
    try:
        return datetime.fromtimestamp(seconds, timezone.utc)
    except (OverflowError, OSError):  # inf, or too far from 1970 for the platform
        raise ValueError(f"{text} is out of range as unix seconds") from None


# WhatsApp .txt: "DATE, TIME - Name: text" on Android, "[DATE, TIME] Name: text" on iOS, with the date
# and time in the phone's locale: day or month first, 2- or 4-digit years, "/", "." or "-" between
# fields, 24-hour or 12-hour clocks ("9:05 PM", "9:05 pm", "9:05 a.m."; recent phones put a narrow
# no-break space U+202F before PM, which \s matches).
_WA_DATE = r"(\d{1,4})[./-](\d{1,2})[./-](\d{2,4})"
_WA_TIME = r"(\d{1,2})[:.](\d{2})(?:[:.](\d{2}))?(?:\s?([AaPp])\.?\s?[Mm]\.?)?"
_WA_ANDROID = re.compile(rf"{_WA_DATE},?\s{_WA_TIME} - (.*)")
_WA_IOS = re.compile(rf"\[{_WA_DATE},?\s{_WA_TIME}\] (.*)")
# Exported without media, an attachment leaves a placeholder where its message was.
_WA_MEDIA = re.compile(r"<Media omitted>|(?:image|video|audio|sticker|GIF|Contact card) omitted"
                       r"|(?:.+ )?document omitted|<attached: .+>|.+ \(file attached\)", re.IGNORECASE)
_WA_DELETED = re.compile(r"(?:This message was deleted|You deleted this message)\.?")
_WA_EDITED = re.compile(r"\s*\u200e?<This message was edited>$")
_LRM = "\u200e"  # left-to-right mark: iOS writes it before attachment lines and inside its own notes


def _read_whatsapp(path: Path) -> tuple[list[Message], Counter]:
    # Pass 1: split the file into entries. A line that doesn't start with a timestamp continues the
    # message above it: that is how a message with line breaks is exported.
    entries = []  # [line number, the 7 date and time fields, text after the timestamp]
    for n, line in enumerate(_read_text(path).rstrip("\n").split("\n"), 1):
        bare = line.lstrip(_LRM)
        match = _WA_IOS.match(bare) or _WA_ANDROID.match(bare)
        if match:
            entries.append([n, match.groups()[:7], match.group(8)])
        elif entries:
            entries[-1][2] += "\n" + line
        elif line.strip():
            raise BadInput(f'{path}:{n}: not a WhatsApp chat line; expected one like '
                           f'"31/12/2019, 21:05 - Name: text" or "[31/12/2019, 21:05:33] Name: text", '
                           f'got {line[:60]!r}')

    # Pass 2: the locale's date order, decided by the whole file. "03/04/19" alone is ambiguous, but a
    # file that has "31/12/19" somewhere writes the day first, and one with "12/31/19" the month first.
    impossible = next((n for n, f, _ in entries if len(f[0]) < 4 and int(f[0]) > 12 and int(f[1]) > 12), None)
    if impossible:  # neither field can be the month
        raise BadInput(f"{path}:{impossible}: not a valid date and time")
    day_first_line = next((n for n, f, _ in entries if len(f[0]) < 4 and int(f[0]) > 12), None)
    month_first_line = next((n for n, f, _ in entries if len(f[0]) < 4 and int(f[1]) > 12), None)
    if day_first_line and month_first_line:
        raise BadInput(f"{path} mixes date orders: line {day_first_line} puts the day first, "
                       f"line {month_first_line} the month")
    # Undecidable (no day above 12 in the whole file): assume day first, as most of the world writes it.
    day_first = month_first_line is None

    messages, dropped = [], Counter()
    for n, fields, rest in entries:
        try:
            time = _whatsapp_time(fields, day_first)
        except ValueError:
            raise BadInput(f"{path}:{n}: not a valid date and time") from None
        speaker, colon, text = rest.lstrip(_LRM).partition(": ")
        if not colon:  # "Sam added Tom", "Messages and calls are end-to-end encrypted...": no one wrote it
            dropped["system"] += 1
            continue
        text = _WA_EDITED.sub("", text)
        # Placeholders are matched without the marks, which iOS also puts inside them:
        # "trip.pdf • \u200e3 pages \u200edocument omitted".
        plain = text.replace(_LRM, "")
        first_line, _, caption = plain.partition("\n")
        if _WA_DELETED.fullmatch(plain):
            dropped["deleted"] += 1
        elif _WA_MEDIA.fullmatch(first_line) and not caption.strip():
            dropped["media"] += 1
        elif _WA_MEDIA.fullmatch(first_line):
            # Android writes a photo's caption on the lines after "IMG-....jpg (file attached)".
            messages.append(Message(time, speaker, caption))
        elif text.startswith(_LRM):
            # iOS writes its own notes ("Missed voice call", the encryption notice) as if the other
            # person had sent them, but starts them with a left-to-right mark that nobody types.
            dropped["system"] += 1
        elif not text.strip():
            dropped["empty"] += 1
        else:
            messages.append(Message(time, speaker, text))
    return messages, dropped


def _whatsapp_time(fields, day_first: bool) -> datetime:
    a, b, c, hour, minute, second, am_pm = fields
    if len(a) == 4:  # "2019-12-31": locales that put the year first always put the month next
        year, month, day = a, b, c
    elif day_first:
        day, month, year = a, b, c
    else:
        month, day, year = a, b, c
    year = int(year) + (2000 if len(year) == 2 else 0)
    hour = int(hour)
    if am_pm:  # 12 AM is midnight and 12 PM is noon
        hour = hour % 12 + (12 if am_pm in "Pp" else 0)
    return datetime(year, int(month), int(day), hour, int(minute), int(second or 0))


# Telegram Desktop's "Export chat history" as JSON: result.json with the one chat's "messages".
_TELEGRAM_MEDIA = ("photo", "file", "media_type", "contact_information", "location_information", "poll")


def _telegram_text(text, where: str) -> str:
    """Telegram's "text": a string, or rich text: a list mixing strings with entities such as
    {"type": "link", "text": "..."} (one entity may also stand alone); flattened to the text shown."""
    parts = text if isinstance(text, list) else [text]
    out = []
    for part in parts:
        if isinstance(part, dict):
            part = _get(part, "text", str, f"{where}: a text entity")
        if not isinstance(part, str):
            raise BadInput(f'{where}: "text" must be text or a list of text and entities, '
                           f'not {_KINDS.get(type(part), type(part).__name__)}')
        out.append(part)
    return "".join(out)


def _read_telegram(path: Path) -> tuple[list[Message], Counter]:
    data = read_json(path)
    if isinstance(data, dict) and "chats" in data:
        raise BadInput(f"{path} is a whole-account Telegram export; export one chat instead "
                       f"(open the chat, then ⋮ > Export chat history, format JSON)")
    messages, dropped = [], Counter()
    for i, m in enumerate(_json_messages(path, data, "Telegram"), 1):
        where = f"{path}: message {i}"
        if _get(m, "type", str, where) == "service":  # joins, pins, calls, "changed the group photo"
            dropped["system"] += 1
            continue
        if "forwarded_from" in m:  # someone else's words, not how the sender writes
            dropped["forwarded"] += 1
            continue
        text = _telegram_text(_get(m, "text", (str, list, dict), where), where)
        if not text.strip():  # a photo or file with a caption keeps the caption as its text
            dropped["media" if any(key in m for key in _TELEGRAM_MEDIA) else "empty"] += 1
            continue
        # "date" is the exporting computer's local time; "date_unixtime" (newer exports) is exact.
        if "date_unixtime" in m:
            time = _unix_time(_get(m, "date_unixtime", (str, int), where), where, "date_unixtime")
        else:
            try:
                time = datetime.fromisoformat(_get(m, "date", str, where))
            except ValueError:
                raise BadInput(f"{where} has an unreadable date") from None
        # A deleted account exports as "from": null; its "from_id" still tells it apart.
        speaker = _get(m, "from", (str, type(None)), where, None) or _get(m, "from_id", str, where)
        messages.append(Message(time, speaker, text))
    return messages, dropped


# DiscordChatExporter's JSON: one channel (or DM) with its "messages".
def _read_discord(path: Path) -> tuple[list[Message], Counter]:
    messages, dropped = [], Counter()
    for i, m in enumerate(_json_messages(path, read_json(path), "DiscordChatExporter"), 1):
        where = f"{path}: message {i}"
        # Only these two types are written by a person; the others (pins, joins, renames,
        # "started a call") are Discord's own notices.
        kind = _get(m, "type", str, where)
        if kind not in ("Default", "Reply"):
            dropped["call" if kind == "Call" else "system"] += 1
            continue
        author = _get(m, "author", dict, where)
        if author.get("isBot"):
            dropped["bot"] += 1
            continue
        content = _get(m, "content", str, where)
        if not content.strip():
            dropped["media" if m.get("attachments") or m.get("stickers") else "empty"] += 1
            continue
        try:  # the exporter writes the offset of the computer it ran on; convert so all times are UTC
            time = datetime.fromisoformat(_get(m, "timestamp", str, where)).astimezone(timezone.utc)
        except (ValueError, OverflowError):
            raise BadInput(f"{where} has an unreadable timestamp") from None
        # The name people see in the chat.
        speaker = _get(author, "nickname", (str, type(None)), f"{where}: author", None) or \
            _get(author, "name", str, f"{where}: author")
        messages.append(Message(time, speaker, content))
    return messages, dropped


# Facebook / Instagram "Download your information" as JSON: a folder per conversation holding
# message_1.json (the newest messages), message_2.json (older ones), ...
_MESSENGER_MEDIA = ("photos", "videos", "audio_files", "gifs", "sticker", "files", "share")
_MESSENGER_REACTION = re.compile(r"(?:.+ )?[Rr]eacted .+ to your message")
_MESSENGER_ATTACHMENT = re.compile(r".+ sent an attachment\.")


def _fix_mojibake(text: str) -> str:
    # Facebook writes each UTF-8 byte as if it were a latin-1 character ("Ã©" for "é", four odd
    # characters for an emoji); encoding back to latin-1 recovers the bytes. Text that can't be
    # recovered that way was correct already (or isn't from Facebook), so it is kept as it is.
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _read_messenger(path: Path) -> tuple[list[Message], Counter]:
    if path.is_dir():
        # Oldest file first: message_10.json, message_9.json, ... (a shorter name is a smaller number).
        files = sorted(path.glob("message_*.json"), key=lambda f: (len(f.name), f.name), reverse=True)
        if not files:
            raise BadInput(f"{path} has no message_*.json files; expected a Messenger conversation folder")
    else:
        files = [path]
    messages, dropped, seen = [], Counter(), set()
    for file in files:
        # Each file lists the newest message first; reversed, messages in the same millisecond keep order.
        for i, m in reversed(list(enumerate(_json_messages(file, read_json(file), "Messenger"), 1))):
            where = f"{file}: message {i}"
            content = _fix_mojibake(_get(m, "content", str, where, ""))
            note = content.strip()
            if m.get("is_unsent"):
                dropped["deleted"] += 1
            elif m.get("type") == "Call":
                dropped["call"] += 1
            elif m.get("type") in ("Subscribe", "Unsubscribe"):  # someone joined or left a group
                dropped["system"] += 1
            elif _MESSENGER_REACTION.fullmatch(note):  # older exports log reactions as messages
                dropped["reaction"] += 1
            elif _MESSENGER_ATTACHMENT.fullmatch(note):  # all that's left of an attachment
                dropped["media"] += 1
            elif not note:
                dropped["media" if any(key in m for key in _MESSENGER_MEDIA) else "empty"] += 1
            else:
                millis = _get(m, "timestamp_ms", (int, float), where)
                sender = _fix_mojibake(_get(m, "sender_name", str, where))
                if (millis, sender, content) in seen:  # the same message in two of the folder's files
                    dropped["duplicate"] += 1
                    continue
                seen.add((millis, sender, content))
                messages.append(Message(_unix_time(millis / 1000, where, "timestamp_ms"), sender, content))
    return messages, dropped


# CSV from anywhere (a spreadsheet, another tool): a header row names the columns, in any case.
_CSV_COLUMNS = {
    "time": ("time", "timestamp", "date", "datetime"),
    "speaker": ("speaker", "sender", "author", "from", "name"),
    "text": ("text", "message", "content", "body"),
    "conversation": ("conversation", "conversation_id", "thread", "chat"),  # optional
}


def _csv_rows(path: Path):
    """(line number, row) of a CSV file, read strictly: an unmatched quote (which would glue the rest of
    the file into one field) or stray text after a closing quote is an error naming the line."""
    csv.field_size_limit(2**31 - 1)  # a long message is a message; the default cap is 128 KiB
    rows = csv.reader(io.StringIO(_read_text(path)), strict=True)
    done = 0  # the line the last whole row ended on
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise BadInput(f'{path}:{done + 1}: a quoted field opened on this line is never closed (an unmatched ")') from None
            raise BadInput(f"{path}:{rows.line_num}: not valid CSV ({e})") from None
        done = rows.line_num  # a quoted field can span several lines: the row ends here
        yield done, row


def _read_csv(path: Path) -> tuple[list[Message], Counter]:
    rows = _csv_rows(path)
    header = [name.strip().lower() for name in next(rows, (0, []))[1]]
    column = {}
    for role, aliases in _CSV_COLUMNS.items():
        found = [header.index(alias) for alias in aliases if alias in header]
        if found:
            column[role] = found[0]
        elif role != "conversation":
            raise BadInput(f"{path} has no {role} column; its header needs one of: {', '.join(aliases)}")
    messages, dropped = [], Counter()
    for n, row in rows:
        if not row:
            continue
        if len(row) != len(header):  # more: most often a comma in an unquoted text, which would cut it
            raise BadInput(f"{path}:{n}: {len(row)} fields, but the header has {len(header)}"
                           + ("; quote a text that holds a comma" if len(row) > len(header) else ""))
        try:
            time = _parse_time(row[column["time"]].strip())
        except ValueError:
            raise BadInput(f"{path}:{n}: can't read the time {row[column['time']]!r}; "
                           f"use ISO-8601 (2023-04-01T18:02:11Z) or unix seconds") from None
        speaker, text = row[column["speaker"]].strip(), row[column["text"]]
        if not speaker:
            raise BadInput(f"{path}:{n}: the speaker is empty")
        if not text.strip():
            dropped["empty"] += 1
            continue
        conversation = row[column["conversation"]].strip() if "conversation" in column else ""
        messages.append(Message(time, speaker, text, conversation or None))
    return messages, dropped


# Canonical JSONL, what write_jsonl writes: one {"time", "speaker", "text", "conversation"?} a line.
def _read_jsonl(path: Path) -> tuple[list[Message], Counter]:
    messages, dropped = [], Counter()
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{n}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise BadInput(f"{path}:{n}: JSON nested too deeply to read") from None
        if not isinstance(row, dict):
            raise BadInput(f"{path}:{n}: expected a JSON object")
        for key in ("time", "speaker", "text"):
            if key not in row:
                raise BadInput(f'{path}:{n}: missing "{key}"')
            if not isinstance(row[key], str):
                raise BadInput(f'{path}:{n}: "{key}" must be a string')
        conversation = row.get("conversation")
        if conversation is not None and not isinstance(conversation, str):
            raise BadInput(f'{path}:{n}: "conversation" must be a string')
        if not row["speaker"]:
            raise BadInput(f'{path}:{n}: "speaker" is empty')
        try:
            time = _parse_time(row["time"])
        except ValueError:
            raise BadInput(f"{path}:{n}: can't read the time {row['time']!r}") from None
        if not row["text"].strip():
            dropped["empty"] += 1
            continue
        messages.append(Message(time, row["speaker"], row["text"], conversation))
    return messages, dropped


# The chitchat corpus (PyPI chitchat-dataset, MIT): 7,168 real conversations between people paired up
# by a study. Some pairs talked many times, so one pair's conversations read like a friend's chat log.
def _chitchat_by_pair() -> dict[frozenset[str], list[tuple[str, list[dict]]]]:
    """Pair of sender ids -> its two-person conversations as (key, messages), most messages first."""
    spec = importlib.util.find_spec("chitchat_dataset")  # found, not imported: we only read its data file
    if spec is None:
        raise BadInput("the chitchat corpus is not installed; pip install chitchat-dataset==0.9.0")
    corpus = json.loads((Path(list(spec.submodule_search_locations)[0]) / "dataset.json").read_text("utf-8"))
    by_pair = defaultdict(list)
    for key, conversation in corpus.items():
        # Consecutive messages of one sender come grouped; flattening the groups keeps their order.
        flat = [m for group in conversation["messages"] for m in group]
        senders = frozenset(m["sender"] for m in flat)
        if len(senders) == 2:
            by_pair[senders].append((key, flat))
    # sorted() is stable, so pairs with equally many messages keep the corpus's order.
    return dict(sorted(by_pair.items(), key=lambda item: -sum(len(flat) for _, flat in item[1])))


def chitchat_pairs() -> list[tuple[frozenset[str], int, int]]:
    """(pair of sender ids, n_conversations, n_messages) for every two-person pair, most messages first."""
    by_pair = _chitchat_by_pair()
    return [(pair, len(convs), sum(len(flat) for _, flat in convs)) for pair, convs in by_pair.items()]


def read_chitchat(rank: int = 0) -> tuple[list[Message], Counter]:
    """All two-person conversations of the pair at this rank (0 = most messages), sorted by time."""
    by_pair = _chitchat_by_pair()
    if not 0 <= rank < len(by_pair):
        raise BadInput(f"--pair {rank} is not a chitchat pair; the corpus has {len(by_pair)} two-person pairs "
                       f"(--pair 0 .. {len(by_pair) - 1})")
    messages, dropped = [], Counter()
    for key, flat in list(by_pair.values())[rank]:
        for m in flat:
            if not m["text"].strip():
                dropped["empty"] += 1
                continue
            messages.append(Message(_parse_time(m["timestamp"]), m["sender"], m["text"], conversation=key))
    messages.sort(key=lambda m: m.time)  # stable: within a second, the corpus's order
    return messages, dropped


# --- Two people, their sessions, and training examples ------------------------------------------
# The chat format the model learns is plain text, one message per line, each line starting with its
# speaker's tag in brackets:
#
#     [RIYA] are we still going tonight?
#     [SAM] yes!! 8:30
#
# Tags are ordinary text, not new special tokens: a new token's embedding starts untrained, so the
# model would meet the most important token of every line as an out-of-distribution vector.

TAG_LINE = re.compile(r"^\[[\w-]+\]", re.MULTILINE)  # a line that starts like a speaker tag (in any script)


def tag(speaker: str) -> str:
    """"Riya Patel" -> "[RIYA_PATEL]", "Ana-María" -> "[ANA-MARÍA]", "明" -> "[明]": letters and digits of
    any script and hyphens kept, every other run of characters one underscore, upper case."""
    name = re.sub(r"[^\w-]+|_+", "_", unicodedata.normalize("NFC", speaker)).strip("_-").upper()
    return "[" + (name or "SPEAKER") + "]"


def one_line(text: str) -> str:
    # A newline ends a turn in our format, so line breaks inside a message become spaces.
    return " ".join(text.split())


def choose_pair(messages, me=None, friend=None, source="the data", how="with --me NAME --friend NAME"):
    """Keep the messages of two people: me and friend, each "SPEAKER" or "SPEAKER=NEW NAME", where
    SPEAKER is a name in the data or 1/2 for the first/second person to speak. With no choice given,
    the data must hold exactly two speakers. how: what to tell a user whose data holds more. Returns
    (messages, drops)."""
    counts = Counter(m.speaker for m in messages)
    order = list(dict.fromkeys(m.speaker for m in messages))  # by first message
    listing = ", ".join(f"{s!r} ({n})" for s, n in counts.most_common(8))
    if len(counts) < 2:
        raise BadInput(f"{source} has only one speaker ({listing}): a conversation needs both sides; "
                       "export the chat with both people's messages")
    if (me is None) != (friend is None):
        raise BadInput(f"{'--me' if me else '--friend'} needs {'--friend' if me else '--me'} too: name both people")
    if me is None:
        if len(counts) > 2:
            raise BadInput(f"{source} has {len(counts)} speakers ({listing}, ...): choose two {how}")
        me, friend = order

    def resolve(choice, flag):
        old, _, new = choice.partition("=")
        lowered = {s.lower(): s for s in counts}
        if old in counts:
            found = old
        elif old.lower() in lowered:
            found = lowered[old.lower()]
        elif old in ("1", "2"):
            found = order[int(old) - 1]
        else:
            raise BadInput(f"{flag} {old!r} is not a speaker in {source}; speakers: {listing}")
        return found, new or found

    (me_old, me_new), (friend_old, friend_new) = resolve(me, "--me"), resolve(friend, "--friend")
    if me_old == friend_old:
        raise BadInput(f"--me and --friend must name two different people (got {me!r} and {friend!r})")
    if tag(me_new) == tag(friend_new):
        raise BadInput(f"{me_new!r} and {friend_new!r} would both be {tag(me_new)} in the chat format; rename one, "
                       f"e.g. --friend '{friend_old}=NEW NAME'")
    names = {me_old: me_new, friend_old: friend_new}
    kept = [Message(m.time, names[m.speaker], m.text, m.conversation) for m in messages if m.speaker in names]
    return kept, Counter({"other speakers": len(messages) - len(kept)} if len(kept) < len(messages) else {})


def clean(messages):
    """Drop text a simulator wrote: a pasted model reply carries the two people's own speaker tags at
    the start of a line. Counted. A message that merely starts with a bracket ("[1] bring snacks") is
    a message, and so is the same message sent twice in a minute. Returns (messages, drops)."""
    tags = {tag(s) for s in {m.speaker for m in messages}}
    pasted = re.compile(r"^(?:" + "|".join(map(re.escape, sorted(tags))) + r")(?:\s|$)", re.MULTILINE)
    kept = [m for m in messages if not pasted.search(m.text)]
    return kept, Counter({"simulator text": len(messages) - len(kept)} if len(kept) < len(messages) else {})


def load_pair(path, me=None, friend=None):
    """Any export prep reads -> (the two people's cleaned messages, drops by reason)."""
    messages, drops = read_export(path)
    how = f"with python prep.py {path} --me NAME --friend NAME --out data/chat.jsonl, then use data/chat.jsonl"
    messages, dropped = choose_pair(messages, me, friend, source=str(path), how=how)
    drops += dropped
    messages, dropped = clean(messages)
    drops += dropped
    return messages, drops


def sessions(messages, gap_hours=3.0):
    """Split messages into sessions wherever the conversation changes or nobody wrote for gap_hours,
    so a training context never reaches into yesterday's conversation. Sessions come out by start time."""
    by_conversation = {}
    for m in sorted(messages, key=lambda m: m.time):
        by_conversation.setdefault(m.conversation, []).append(m)
    out = []
    for conversation in by_conversation.values():
        for prev, m in zip([None] + conversation, conversation):
            if prev is None or (m.time - prev.time).total_seconds() > gap_hours * 3600:
                out.append([])
            out[-1].append(m)
    return sorted(out, key=lambda session: session[0].time)


def split_sessions(messages, gap_hours=3.0, val_frac=0.1):
    """(training sessions, held-out sessions): the latest max(1, round(val_frac * n)) sessions by time
    are held out. The one split of the project: sft.py validates on it, and eval.py, tda.py and the
    RL stages keep to its training side or its held-out side."""
    split = sessions(messages, gap_hours)
    n_val = max(1, round(val_frac * len(split)))
    if len(split) - n_val < 1:
        raise BadInput(f"only {len(split)} session(s): need at least two, one to train on and one held out "
                       f"(sessions split at gaps of {gap_hours} hours; try a larger --session-gap-hours)")
    return split[:-n_val], split[-n_val:]


@dataclass
class Example:
    tokens: list[int]
    loss_mask: list[bool]  # True on the target message's tokens and the newline that ends its turn
    weight: float  # recency weight (1.0 unless asked for)
    text: str  # the rendered example: context lines, then the target's line
    cut: int  # text[:cut] is the prompt (ending in the target's tag), text[cut:] the reply
    session: int  # the target is message `index` of session `session` of its side of split_sessions
    index: int
    tag_start: int  # tokens[tag_start : loss start] are the target's speaker tag (sft.py --tag-loss)


def render(context, target, tags):
    """(text, where the loss starts). The loss covers the target's text and the newline that ends it,
    not its tag: at generation time the tag is part of the prompt ("...\n[SAM]")."""
    lines = [f"{tags[m.speaker]} {one_line(m.text)}" for m in context]
    head = "".join(line + "\n" for line in lines) + tags[target.speaker]
    return head + " " + one_line(target.text) + "\n", len(head)


def encode_example(tok, context, target, tags, max_len):
    """Tokenise the whole example once and mark the target's tokens. The loss boundary comes from that
    one tokenisation: the prefix up to the target's tag is encoded too, and its tokens must be the
    first tokens of the whole (the cut sits before a space, where both SentencePiece and byte-level
    BPE start a new token). Tokenising target and context separately would not do: SentencePiece
    cuts "[SAM]" differently after a newline than at the start of a text."""
    while True:
        text, cut = render(context, target, tags)
        tokens = tok.encode(text)
        if len(tokens) <= max_len or not context:
            break
        context = context[1:]  # too long: drop the oldest context message
    n = shared_prefix(tokens, tok.encode(text[:cut]))
    tokens = tokens[:max_len]  # a single message longer than max_len: keep what fits
    return tokens, [i >= n for i in range(len(tokens))], text, cut


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share: where a text's tokens stop being its prefix's."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# Lexical retrieval over messages: eval.py's retrieval baseline, tda.py's attribution baseline, memory.

def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 (Robertson & Zaragoza 2009, https://doi.org/10.1561/1500000019), the lexical baseline:
    score(q, d) = sum over the distinct words w of q of
        idf(w) * tf(w, d) * (k1 + 1) / (tf(w, d) + k1 * (1 - b + b * |d| / mean |d|)),
    idf(w) = ln(1 + (N - n(w) + 0.5) / (n(w) + 0.5)), n(w) = documents holding w (Lucene's idf: never
    negative, so a word in most messages still counts a little)."""

    def __init__(self, docs: list[list[str]], k1=1.5, b=0.75):
        self.k1, self.b, self.n_docs = k1, b, len(docs)
        self.length = np.array([len(d) for d in docs], dtype=float)  # (N,)
        counts = defaultdict(dict)  # word -> {document: count}
        for j, d in enumerate(docs):
            for w, c in Counter(d).items():
                counts[w][j] = c
        self.postings = {w: (np.array(list(c)), np.array(list(c.values()), dtype=float))  # (n(w),) each
                         for w, c in counts.items()}

    def scores(self, query: list[str]) -> np.ndarray:
        out = np.zeros(self.n_docs)  # (N,)
        for w in set(query) & self.postings.keys():
            docs, tf = self.postings[w]
            idf = np.log(1 + (self.n_docs - len(docs) + 0.5) / (len(docs) + 0.5))
            norm = 1 - self.b + self.b * self.length[docs] / self.length.mean()
            out[docs] += idf * tf * (self.k1 + 1) / (tf + self.k1 * norm)
        return out


def build_examples(messages, tok, context_messages=8, gap_hours=3.0, val_frac=0.1, max_len=512,
                   recency_half_life_days=None, seed=0):
    """Messages of two people -> (train, val) examples. Every message is a target once, after a
    random number k in 0..context_messages of the messages before it in its session (k = 0: opening
    a conversation). Validation = the held-out side of split_sessions, the latest sessions by time."""
    if not messages:
        raise BadInput("no messages left to train on")
    tags = {s: tag(s) for s in dict.fromkeys(m.speaker for m in messages)}
    train_sessions, held_out = split_sessions(messages, gap_hours, val_frac)
    latest = max(m.time for m in messages)
    rng = random.Random(seed)  # one stream over both sides, in time order: the contexts drawn stay as they were
    examples = {"train": [], "val": []}
    for side, split in (("train", train_sessions), ("val", held_out)):
        for s, session in enumerate(progress(split, desc=f"tokenizing ({side})", unit="session", leave=False)):
            for i, target in enumerate(session):
                k = rng.randint(0, min(context_messages, i))
                tokens, mask, text, cut = encode_example(tok, session[i - k : i], target, tags, max_len)
                tag_start = shared_prefix(tokens, tok.encode(text[: cut - len(tags[target.speaker])]))
                weight = 1.0
                if recency_half_life_days:
                    weight = 0.5 ** ((latest - target.time).total_seconds() / 86400 / recency_half_life_days)
                examples[side].append(Example(tokens, mask, weight, text, cut, s, i, tag_start))
    return examples["train"], examples["val"]


def main():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="a chat export (file, or a Messenger folder), or 'chitchat' for the public corpus")
    p.add_argument("--format", choices=FORMATS, help="skip format detection")
    p.add_argument("--me", help="SPEAKER or SPEAKER=NEW_NAME: you (a name in the export, or 1/2 = first/second to speak)")
    p.add_argument("--friend", help="SPEAKER or SPEAKER=NEW_NAME: the other person")
    p.add_argument("--pair", type=int, default=0, help="chitchat only: which pair, 0 = most messages (default: 0)")
    p.add_argument("--out", default="data/chat.jsonl", help="canonical JSONL to write (default: data/chat.jsonl, "
                   "which git ignores: chat logs are personal data)")
    args = p.parse_args()
    if args.export == "chitchat":
        messages, drops = read_chitchat(args.pair)
    else:
        messages, drops = read_export(args.export, args.format)
    n_read = len(messages) + sum(drops.values())
    messages, dropped = choose_pair(messages, args.me, args.friend, source=args.export)
    drops += dropped
    messages, dropped = clean(messages)
    drops += dropped
    write_jsonl(messages, args.out)
    per_speaker = ", ".join(f"{tag(s)} {n}" for s, n in Counter(m.speaker for m in messages).most_common())
    print(f"{args.export}: {n_read} messages read; dropped {dict(drops.most_common()) or 'none'}")
    print(f"wrote {len(messages)} messages ({per_speaker}) in {len(sessions(messages))} sessions to {args.out}")


if __name__ == "__main__":
    exit_on_bad_input(main)
