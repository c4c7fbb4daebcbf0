"""Bad input and faults, as a new user meets them: every expected failure is one sentence that names the
file, line or flag, exit status 2, and no traceback; every valid-but-odd input keeps its messages
(messages in = messages out + counted drops). The fixtures are written here, from code."""
import ast
import contextlib
import importlib
import io
import json
import sys
import traceback
from pathlib import Path

import pytest
import torch

import cli
import prep
from conftest import script

T = "2023-04-01T18:02:11Z"


def run_main(module: str, *argv) -> tuple[int | str, str]:
    """A script's main() in this process, as its command line runs it: (exit status, stderr). An
    exception that escapes is reported as the status "traceback" with the traceback as its text."""
    mod = importlib.import_module(module)
    err, old = io.StringIO(), sys.argv
    sys.argv = [f"{module}.py", *map(str, argv)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.exit_on_bad_input(mod.main)
        return 0, err.getvalue()
    except SystemExit as e:
        return e.code, err.getvalue()
    except BaseException:
        return "traceback", traceback.format_exc()
    finally:
        sys.argv = old


def assert_one_sentence(status, stderr, names):
    assert status == 2, f"exit {status}: {stderr[-2000:]}"
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert names in errors[0], f"{names!r} not in {errors[0]!r}"


def telegram(*messages):
    return {"name": "Sam", "type": "personal_chat", "messages": list(messages)}


def tg(text, **kw):
    return {"id": 1, "type": "message", "date": "2023-04-01T18:02:11", "date_unixtime": "1680372131",
            "from": "Sam", "from_id": "user1", "text": text, **kw}


def discord(*messages):
    return {"guild": {"id": "0"}, "channel": {"id": "1"}, "messages": list(messages)}


def dc(**kw):
    return {"id": "1", "type": "Default", "timestamp": "2023-04-01T18:02:11+02:00", "content": "hi",
            "author": {"id": "7", "name": "sam", "nickname": "Sam", "isBot": False}, **kw}


def messenger(*messages):
    return {"participants": [{"name": "Sam"}, {"name": "Riya"}], "messages": list(messages)}


def ms(**kw):
    return {"sender_name": "Sam", "timestamp_ms": 1680372131000, "content": "hi", **kw}


def nested(depth):
    return "[" * depth + "]" * depth


# Each case: (name, file name, contents (text, or a JSON value), the words the error must contain).
IMPORTER_CASES = [
    ("telegram text null", "t.json", telegram(tg(None)), 'message 1: "text" must be'),
    ("telegram text int part", "t.json", telegram(tg(["a ", 5])), 'message 1: "text" must be text or a list'),
    ("telegram message not an object", "t.json", telegram(tg("hi"), "hello"), "message 2 is not a JSON object"),
    ("telegram entity without text", "t.json", telegram(tg([{"type": "bold"}])), 'a text entity has no "text"'),
    ("telegram time out of range", "t.json", telegram(tg("hi", date_unixtime="99999999999999999")),
     '"date_unixtime" \'99999999999999999\' is not a time'),
    ("telegram type not text", "t.json", telegram(tg("hi", type=3)), '"type" must be text'),
    ("telegram from a number", "t.json", telegram(tg("hi", **{"from": 12})), '"from" must be text or null'),
    ("discord author null", "d.json", discord(dc(author=None)), '"author" must be an object'),
    ("discord content null", "d.json", discord(dc(content=None)), '"content" must be text'),
    ("discord name missing", "d.json", discord(dc(author={"id": "7"})), 'author has no "name"'),
    ("discord timestamp garbage", "d.json", discord(dc(timestamp="yesterday")), "message 1 has an unreadable timestamp"),
    ("messenger content null", "m.json", messenger(ms(content=None)), '"content" must be text'),
    ("messenger string timestamp", "m.json", messenger(ms(timestamp_ms="1680372131000")),
     '"timestamp_ms" must be a number'),
    ("messenger timestamp out of range", "m.json", messenger(ms(timestamp_ms=1e30)), '"timestamp_ms"'),
    ("json nested too deep", "t.json", nested(100_000), "nested too deeply"),
    ("jsonl nested too deep", "c.jsonl", nested(100_000) + "\n", "c.jsonl:1: JSON nested too deeply"),
    ("jsonl time out of range", "c.jsonl", json.dumps({"time": "1e20", "speaker": "a", "text": "b"}) + "\n",
     "c.jsonl:1: can't read the time"),
    ("jsonl speaker null", "c.jsonl", json.dumps({"time": T, "speaker": None, "text": "b"}) + "\n",
     'c.jsonl:1: "speaker" must be a string'),
    ("csv more fields than the header", "c.csv", f"time,speaker,text\n{T},Sam,hi, there\n",
     "c.csv:2: 4 fields, but the header has 3; quote a text that holds a comma"),
    ("csv fewer fields than the header", "c.csv", f"time,speaker,text\n{T},Sam\n", "c.csv:2: 2 fields"),
    ("csv unterminated quote", "c.csv", f'time,speaker,text\n{T},Sam,"hi\n{T},Riya,yo\n{T},Sam,ok\n',
     "c.csv:2: a quoted field opened on this line is never closed"),
    ("csv text after a closing quote", "c.csv", f'time,speaker,text\n{T},Sam,"hi"x\n', "c.csv:2: not valid CSV"),
    ("whatsapp month 13", "w.txt", "13/13/2020, 21:05 - Sam: hi\n14/01/2020, 21:06 - Riya: yo\n",
     "w.txt:1: not a valid date and time"),
    ("whatsapp february 30", "w.txt", "30/02/2020, 21:05 - Sam: hi\n", "w.txt:1: not a valid date and time"),
    ("not utf-8", "w.txt", b"\xff\xfe\x00garbage", "is not UTF-8 text"),
    ("empty file", "w.txt", "", "w.txt is empty"),
]


@pytest.mark.parametrize("name, file, contents, says", IMPORTER_CASES, ids=[c[0] for c in IMPORTER_CASES])
def test_a_malformed_export_is_one_sentence_naming_file_and_message(tmp_path, name, file, contents, says):
    path = tmp_path / file
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    else:
        path.write_text(contents if isinstance(contents, str) else json.dumps(contents), encoding="utf-8")
    status, stderr = run_main("prep", path, "--out", tmp_path / "out.jsonl")
    assert_one_sentence(status, stderr, says)
    assert str(path) in stderr
    assert not (tmp_path / "out.jsonl").exists()


def prep_report(tmp_path, path, *flags):
    """Run prep.py; returns (messages it read, drops by reason, the messages it wrote)."""
    out = tmp_path / "out.jsonl"
    run = script("prep.py", str(path), "--out", str(out), *flags)
    assert run.returncode == 0, run.stderr
    read_line, wrote_line = run.stdout.splitlines()
    n_read = int(read_line.split(": ")[1].split()[0])
    drops = {} if read_line.endswith("dropped none") else ast.literal_eval(read_line.split("dropped ", 1)[1])
    messages, _ = prep.read_export(out)
    assert int(wrote_line.split()[1]) == len(messages)
    return n_read, drops, messages


ODD_CASES = [
    ("telegram entities flattened", "t.json",
     telegram(tg([{"type": "bold", "text": "so "}, "good ", {"type": "link", "text": "x.io"}]),
              tg({"type": "italic", "text": "one entity alone"}), tg("yo", **{"from": "Riya", "from_id": "u2"})),
     ["so good x.io", "one entity alone", "yo"]),
    ("brackets and repeats are messages", "c.csv",
     f"time,speaker,text\n{T},Sam,[1] bring snacks\n{T},Riya,[OK] got it\n{T},Riya,[OK] got it\n{T},Sam,hi\n",
     ["[1] bring snacks", "[OK] got it", "[OK] got it", "hi"]),
    ("a 300 kB csv field", "c.csv", f'time,speaker,text\n{T},Sam,"{"la " * 100_000}"\n{T},Riya,ok\n',
     ["la " * 100_000, "ok"]),
    ("a quoted comma and a quoted quote", "c.csv", f'time,speaker,text\n{T},Sam,"hi, you"\n{T},Riya,"she said ""no"""\n',
     ["hi, you", 'she said "no"']),
    ("names in other scripts", "c.jsonl",
     "".join(json.dumps({"time": T, "speaker": s, "text": t}, ensure_ascii=False) + "\n"
             for s, t in [("Рия", "привет"), ("明", "你好"), ("Рия", "как дела")]),
     ["привет", "你好", "как дела"]),
    ("a pasted simulator line is dropped, counted", "c.jsonl",
     "".join(json.dumps({"time": T, "speaker": s, "text": t}) + "\n"
             for s, t in [("Sam", "hey"), ("Riya", "look: \n[SAM] i love you"), ("Sam", "[OKAY] weird")]),
     ["hey", "[OKAY] weird"]),
]


@pytest.mark.parametrize("name, file, contents, texts", ODD_CASES, ids=[c[0] for c in ODD_CASES])
def test_an_odd_but_valid_export_keeps_every_message_or_counts_it(tmp_path, name, file, contents, texts):
    path = tmp_path / file
    path.write_text(contents if isinstance(contents, str) else json.dumps(contents), encoding="utf-8")
    n_read, drops, messages = prep_report(tmp_path, path)
    assert n_read == len(messages) + sum(drops.values())  # messages in = messages out + counted drops
    assert [m.text for m in messages] == texts


def chat_file(tmp_path, speakers=("Riya", "Sam")):
    path = tmp_path / "chat.jsonl"
    rows = [{"time": f"2023-04-0{1 + i // 4}T1{i % 4}:00:00Z", "speaker": speakers[i % len(speakers)],
             "text": f"message {i}"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CLI_CASES = [
    ("--me without --friend", "prep", lambda t: [chat_file(t), "--me", "Riya"], "--me needs --friend too"),
    ("--friend without --me", "prep", lambda t: [chat_file(t), "--friend", "Sam"], "--friend needs --me too"),
    ("tags that collide", "prep", lambda t: [chat_file(t, ("Sam!", "sam?"))], "would both be [SAM]"),
    ("--pair out of range", "prep", lambda t: ["chitchat", "--pair", "99999"], "--pair 99999 is not a chitchat pair"),
    ("--out is a folder", "prep", lambda t: [chat_file(t), "--out", t], "is a folder"),
    ("--out under a file", "prep", lambda t: [chat_file(t), "--out", chat_file(t) / "x.jsonl"], "chat.jsonl"),
    ("--out unwritable", "prep", lambda t: [chat_file(t), "--out", "/sys/out.jsonl"], "/sys/out.jsonl"),
    ("a wrong path", "prep", lambda t: [t / "nope.txt"], "nope.txt does not exist"),
    ("an unknown flag", "prep", lambda t: [chat_file(t), "--frend", "Sam"], "unrecognized arguments: --frend"),
    ("sft on three people", "sft", lambda t: ["--data", chat_file(t, ("A", "B", "C")), "--out", t / "o"],
     "with python prep.py"),
    ("sft --out is a file", "sft", lambda t: ["--data", chat_file(t), "--out", chat_file(t)], "chat.jsonl"),
    ("--val-frac 1", "sft", lambda t: ["--val-frac", "1"], "--val-frac 1.0: must be in (0, 1)"),
    ("--max-steps 0", "sft", lambda t: ["--max-steps", "0"], "--max-steps 0: must be >= 1"),
    ("--lr negative", "sft", lambda t: ["--lr", "-0.0001"], "--lr -0.0001: must be > 0"),
    ("--lora-dropout 1", "sft", lambda t: ["--lora-dropout", "1"], "--lora-dropout 1.0: must be in [0, 1)"),
    ("--lr nan", "sft", lambda t: ["--lr", "nan"], "--lr nan: must be > 0"),
    ("--max-steps text", "sft", lambda t: ["--max-steps", "ten"], "argument --max-steps: invalid int value"),
    ("--temperature negative", "sample", lambda t: ["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    ("--top-p 0", "sample", lambda t: ["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    ("--top-k negative", "sample", lambda t: ["--top-k", "-1"], "--top-k -1: must be >= 0"),
    ("--min-p 2", "sample", lambda t: ["--min-p", "2"], "--min-p 2.0: must be in [0, 1]"),
    ("--repetition-penalty 0", "sample", lambda t: ["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be > 0"),
    ("--n 0", "sample", lambda t: ["--n", "0"], "--n 0: must be >= 1"),
    ("--max-new-tokens 0", "sample", lambda t: ["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    ("--long-context negative", "eval", lambda t: ["--long-context", "-5"], "--long-context -5: must be >= 0"),
    ("--k 0", "tda", lambda t: ["query", "--k", "0"], "--k 0: must be >= 1"),
    ("no tda command", "tda", lambda t: ["--k", "3"], "the first argument names the command"),
    ("--queries 0", "tda", lambda t: ["eval", "--queries", "0"], "--queries 0: must be >= 1"),
    ("--planted and --tail-patch", "tda", lambda t: ["eval", "--planted", "--tail-patch"], "two evaluations"),
    ("--tail-patch no index", "tda", lambda t: ["eval", "--tail-patch", "--index", str(t / "x")], "--index"),
    ("--mode unknown", "tda", lambda t: ["query", "--mode", "words"], "--mode words: act, lens, grad"),
    ("--damping 0", "tda", lambda t: ["query", "--damping", "0"], "--damping 0.0: must be > 0"),
    ("--max-kl 0", "steer", lambda t: ["search", "--max-kl", "0"], "--max-kl 0.0: must be > 0"),
    ("steer eval no vector", "steer", lambda t: ["eval", "--name", str(t / "none")], "no steering vector at"),
    ("steer eval --replies 0", "steer", lambda t: ["eval", "--replies", "0"], "--replies 0: must be >= 1"),
    ("bench --repeats 0", "bench", lambda t: ["--repeats", "0"], "--repeats 0: must be >= 1"),
]


@pytest.mark.parametrize("name, module, argv, says", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_a_bad_flag_or_path_is_one_sentence_naming_it(tmp_path, name, module, argv, says):
    assert_one_sentence(*run_main(module, *argv(tmp_path)), says)


# Model, adapter and other safetensors/JSON files that are corrupt, cut short or wrong.

def model_dir_with(tiny_chat_dir, tmp_path, edit):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(tiny_chat_dir, path)
    edit(path)
    return path


def adapter_dir_with(tiny_adapter, tmp_path, edit):
    import shutil

    path = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, path)
    edit(path)
    return path


def set_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


MODEL_CASES = [
    ("zero-byte weights", lambda p: (p / "model.safetensors").write_bytes(b""), "model.safetensors is not a readable safetensors file"),
    ("truncated weights", lambda p: truncate(p / "model.safetensors"), "model.safetensors is not a readable safetensors file"),
    ("config not JSON", lambda p: (p / "config.json").write_text("{oops"), "config.json:1: not valid JSON"),
    ("config missing a key", lambda p: set_json(p / "config.json", hidden_size=None), "'hidden_size' must be a positive integer"),
    ("config wrong type", lambda p: set_json(p / "config.json", num_hidden_layers="3"), "'num_hidden_layers' must be a positive integer"),
    ("config heads that don't divide", lambda p: set_json(p / "config.json", num_key_value_heads=3), "can't share 3 key/value heads"),
    ("config a list", lambda p: (p / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object"),
    ("weights of another shape", lambda p: set_json(p / "config.json", intermediate_size=50), "has shape"),
    ("tokenizer corrupt", lambda p: (p / "tokenizer.json").write_text("{}"), "its tokenizer file can't be read"),
]


@pytest.mark.parametrize("name, edit, says", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_a_corrupt_or_malformed_model_directory_is_one_sentence(tiny_chat_dir, tmp_path, name, edit, says):
    path = model_dir_with(tiny_chat_dir, tmp_path, edit)
    assert_one_sentence(*run_main("sample", "--base", "--model", path, "--prompt", "[RIYA] hi"), says)


ADAPTER_CASES = [
    ("zero-byte adapter", lambda p: (p / "adapter_model.safetensors").write_bytes(b""), "adapter_model.safetensors is not a readable safetensors file"),
    ("truncated adapter", lambda p: truncate(p / "adapter_model.safetensors", 0.9), "adapter_model.safetensors is not a readable safetensors file"),
    ("adapter config not JSON", lambda p: (p / "adapter_config.json").write_text(""), "adapter_config.json:1: not valid JSON"),
    ("r 0", lambda p: set_json(p / "adapter_config.json", r=0), "'r' must be a positive integer, got 0"),
    ("r text", lambda p: set_json(p / "adapter_config.json", r="4"), "'r' must be a positive integer, got '4'"),
    ("alpha missing", lambda p: set_json(p / "adapter_config.json", lora_alpha=None), "'lora_alpha' must be a positive number"),
    ("targets empty", lambda p: set_json(p / "adapter_config.json", target_modules=[]), "'target_modules' must be a list"),
    ("no base named", lambda p: set_json(p / "adapter_config.json", base_model_name_or_path=None), "does not name its base model"),
    ("training.json not JSON", lambda p: (p / "training.json").write_text("{"), "training.json:1: not valid JSON"),
    ("training.json a list", lambda p: (p / "training.json").write_text("[]"), "training.json: expected a JSON object"),
]


@pytest.mark.parametrize("name, edit, says", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_a_corrupt_or_malformed_adapter_is_one_sentence(tiny_adapter, tmp_path, name, edit, says):
    path = adapter_dir_with(tiny_adapter, tmp_path, edit)
    assert_one_sentence(*run_main("sample", "--adapter", path, "--prompt", "[RIYA] hi"), says)


@pytest.mark.parametrize("contents", [b"", b"\x00" * 100, b"not safetensors at all"])
@pytest.mark.parametrize("kind", ["steering vector", "index"])
def test_a_corrupt_vector_or_index_is_one_sentence(tiny_adapter, tmp_path, kind, contents):
    path = tmp_path / "x.safetensors"
    path.write_bytes(contents)
    if kind == "steering vector":
        status, err = run_main("sample", "--adapter", tiny_adapter, "--prompt", "[RIYA] hi", "--steer", f"{path}:1")
        assert_one_sentence(status, err, "is not a steering vector file")
    else:
        status, err = run_main("tda", "query", "--index", path, "--prompt", "[RIYA] hi\\n[FRIEND]")
        assert_one_sentence(status, err, "is not an index tda.py wrote")


def test_an_adapter_is_refused_on_another_base_unless_asked(tiny_adapter, tiny_dir, tmp_path):
    import shutil

    other = tmp_path / "other"  # the same shape, other weights
    from transformers import MistralConfig, MistralForCausalLM

    from conftest import TINY
    from smollm2 import converted_dir

    torch.manual_seed(5)
    MistralForCausalLM(MistralConfig(**{**TINY, "vocab_size": 49152}, bos_token_id=1, eos_token_id=2)).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted_dir() / name, other)
    status, err = run_main("sample", "--adapter", tiny_adapter, "--model", other, "--prompt", "[RIYA] hi",
                           "--max-new-tokens", "2")
    assert_one_sentence(status, err, "was trained on")
    assert str(other) in err and "--allow-other-base" in err
    status, err = run_main("sample", "--adapter", tiny_adapter, "--model", other, "--prompt", "[RIYA] hi",
                           "--max-new-tokens", "2", "--allow-other-base")
    assert status == 0, err


def test_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "chat.jsonl"
    messages, _ = prep.read_export(chat_file(tmp_path))
    prep.write_jsonl(messages, path)
    before = path.read_bytes()

    def full(self, *a, **k):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(cli.BadInput, match=r"could not write .*chat.jsonl: No space left on device; "
                                           r"the previous file is left as it was"):
        prep.write_jsonl(messages[:3], path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_resume_checks_the_data_file_by_its_contents_not_its_path(small_chat, tiny_chat_dir, tmp_path):
    import sft

    opts = sft.Options(data=str(small_chat), model=str(tiny_chat_dir), out=str(tmp_path / "run"), max_steps=1,
                       batch_size=2, val_examples=2, samples=0, max_len=64)
    sft.train(opts)
    respelled = str(Path(small_chat).parent / ".." / Path(small_chat).parent.name / Path(small_chat).name)
    sft.train(sft.Options(**{**vars(opts), "data": respelled, "max_steps": 2, "resume": True}))  # the same file
    changed = tmp_path / "changed.jsonl"
    changed.write_text(Path(small_chat).read_text().replace("\"text\": \"", "\"text\": \"x", 1))
    with pytest.raises(cli.BadInput, match="is not the file the run was trained on"):
        sft.train(sft.Options(**{**vars(opts), "data": str(changed), "max_steps": 3, "resume": True}))


def test_cli_failures_run_end_to_end_without_a_traceback(tmp_path):
    # The same failures through a real process (the in-process runs above cover the rest).
    zero = tmp_path / "model"
    zero.mkdir()
    (zero / "config.json").write_text("{")
    for args in (["sample.py", "--base", "--model", str(zero)], ["sft.py", "--val-frac", "1"],
                 ["prep.py", str(tmp_path / "nope.csv")]):
        run = script(*args)
        assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr


def test_quitting_at_once_is_one_sentence_and_status_130(capsys):
    """sft.stop_requests' second Ctrl-C or SIGTERM raises KeyboardInterrupt mid-step: no traceback."""
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        cli.exit_on_bad_input(main)
    err = capsys.readouterr().err
    assert stopped.value.code == 130 and len(err.splitlines()) == 1 and "--resume" in err


@pytest.mark.parametrize("module", ["tda", "steer", "rlaif", "memory"])
def test_help_before_a_command_shows_the_commands_not_an_error(module):
    """`python steer.py --help` is a question, not bad input: the commands and the script's docstring,
    exit status 0 (a command's own --help still lists its flags)."""
    out = script(f"{module}.py", "--help")
    commands = importlib.import_module(module).COMMANDS
    assert out.returncode == 0 and out.stdout.startswith(f"usage: python {module}.py {{{','.join(commands)}}}"), out.stderr
    assert importlib.import_module(module).__doc__.strip().splitlines()[0] in out.stdout
    out = script(f"{module}.py", commands[0], "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {module}.py [-h]"), out.stderr
