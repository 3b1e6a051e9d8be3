"""The ``tokenhub`` command, run as a real process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenhub import vocabs

# The script installed beside this interpreter (.venv/bin/tokenhub), else the one on PATH.
_BESIDE = Path(sys.executable).parent / "tokenhub"
TOKENHUB = str(_BESIDE) if _BESIDE.exists() else (shutil.which("tokenhub") or "tokenhub")
CORPUS = Path(__file__).parent / "corpus"
NAMES = ["cl100k_base", "qwen", "qwen3.6", "deepseek-v4"]


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [TOKENHUB, *args], input=stdin, capture_output=True, timeout=120, check=False
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    )


def assert_one_line_error(
    proc: subprocess.CompletedProcess[str], *needles: str, status: int = 1
) -> None:
    """One line on stderr; exit status 1 (failed) or 2 (refused as given: `status=2`)."""
    assert proc.returncode == status, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tokenhub: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("cli")
    paths = {
        "english": CORPUS / "english.txt",
        "chinese": CORPUS / "chinese.txt",
        "code": CORPUS / "code.py.txt",
    }
    bad = out / "latin1.txt"
    bad.write_bytes("café au lait\n".encode("latin-1"))
    paths["latin1"] = bad
    special = out / "special.txt"
    special.write_text("<|endoftext|> <|im_start|>user\n<｜begin▁of▁sentence｜>", encoding="utf-8")
    paths["special"] = special
    empty = out / "empty.txt"
    empty.write_bytes(b"")
    paths["empty"] = empty
    return paths


def test_count_one_file_prints_just_the_count(meters, files):
    path = files["english"]
    proc = run("count", "--vocab", "cl100k_base", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{meters['cl100k_base'].count(path.read_text(encoding='utf-8'))}\n"
    assert proc.stderr == ""


def test_count_special_token_text_as_plain_text(meters, references, files):
    text = files["special"].read_text(encoding="utf-8")
    proc = run("count", "--vocab", "qwen", str(files["special"]))
    assert proc.stdout == f"{len(references['qwen'].encode(text))}\n"


def test_count_empty_file(files):
    proc = run("count", "--vocab", "deepseek-v4", str(files["empty"]))
    assert (proc.returncode, proc.stdout) == (0, "0\n")


@pytest.mark.parametrize("args", [[], ["-"]], ids=["no-file", "dash"])
def test_count_reads_stdin(meters, args):
    text = "Hello from stdin, 你好! don't stop\r\n"
    proc = run("count", "--vocab", "deepseek-v4", *args, stdin=text.encode("utf-8"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{meters['deepseek-v4'].count(text)}\n"


def test_count_json(meters, files):
    paths = [files["english"], files["chinese"]]
    proc = run("count", "--vocab", "qwen", "--json", *map(str, paths))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    counts = [meters["qwen"].count(p.read_text(encoding="utf-8")) for p in paths]
    sizes = [p.stat().st_size for p in paths]
    assert [f["file"] for f in out["files"]] == [str(p) for p in paths]
    assert [f["tokens"] for f in out["files"]] == counts
    assert [f["bytes"] for f in out["files"]] == sizes
    assert out["total_tokens"] == sum(counts)
    assert out["total_bytes"] == sum(sizes)


def test_count_json_several_vocabularies_and_stdin(meters):
    text = "stdin text with 12345 digits"
    proc = run("count", "--vocab", "cl100k_base,deepseek-v4", "--json", stdin=text.encode())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    want = {name: meters[name].count(text) for name in ["cl100k_base", "deepseek-v4"]}
    assert out["files"][0]["tokens"] == want
    assert out["files"][0]["bytes"] == len(text.encode())
    assert out["total_tokens"] == want


def _table(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.strip()]


def test_count_all_vocabularies_prints_a_table(meters, files):
    paths = [files["english"], files["chinese"], files["code"]]
    proc = run("count", "--vocab", "all", *map(str, paths))
    assert proc.returncode == 0, proc.stderr
    rows = _table(proc.stdout)
    header = rows[0]
    assert set(NAMES) <= set(header)
    by_label = {row[0]: row for row in rows[1:]}
    assert set(by_label) == {*map(str, paths), "total"}
    for name in NAMES:
        col = header.index(name)
        counts = [meters[name].count(p.read_text(encoding="utf-8")) for p in paths]
        for path, count in zip(paths, counts, strict=True):
            assert int(by_label[str(path)][col]) == count, (name, path)
        assert int(by_label["total"][col]) == sum(counts)
    col = header.index("bytes")
    assert int(by_label["total"][col]) == sum(p.stat().st_size for p in paths)


def test_count_comma_list_prints_a_table(meters, files):
    path = files["code"]
    proc = run("count", "--vocab", "qwen,qwen3.6", str(path))
    assert proc.returncode == 0, proc.stderr
    header, row = _table(proc.stdout)
    text = path.read_text(encoding="utf-8")
    for name in ["qwen", "qwen3.6"]:
        assert int(row[header.index(name)]) == meters[name].count(text)
    assert "deepseek-v4" not in header


def test_missing_file(files, tmp_path):
    missing = tmp_path / "no-such-file.txt"
    proc = run("count", "--vocab", "cl100k_base", str(files["english"]), str(missing))
    assert_one_line_error(proc, str(missing))


def test_directory_instead_of_file(tmp_path):
    assert_one_line_error(run("count", "--vocab", "cl100k_base", str(tmp_path)), str(tmp_path))


def test_unknown_vocabulary(files):
    proc = run("count", "--vocab", "gpt-9", str(files["english"]))
    assert_one_line_error(proc, "gpt-9", *vocabs.VOCABS, status=2)


def test_unknown_vocabulary_in_a_list(files):
    proc = run("count", "--vocab", "qwen,nope", str(files["english"]))
    assert_one_line_error(proc, "nope", status=2)


def test_non_utf8_file(files):
    proc = run("count", "--vocab", "cl100k_base", str(files["latin1"]))
    assert_one_line_error(proc, str(files["latin1"]), "UTF-8", status=2)


def test_non_utf8_stdin():
    proc = run("count", "--vocab", "cl100k_base", stdin=b"ok \xff\xfe bad")
    assert_one_line_error(proc, "UTF-8", status=2)


def test_help():
    proc = run("--help")
    assert proc.returncode == 0
    assert "count" in proc.stdout
    assert "vocabs" in proc.stdout
    assert proc.stdout.startswith("usage: tokenhub")


def test_count_help_describes_the_options():
    proc = run("count", "--help")
    assert proc.returncode == 0
    for option in ["--vocab", "--json", "FILE", "all", "stdin"]:
        assert option in proc.stdout, option


def test_no_command_prints_help_and_exits_2():
    proc = run()
    assert proc.returncode == 2
    assert "usage: tokenhub" in proc.stdout + proc.stderr
    assert "count" in proc.stdout + proc.stderr


def test_count_without_vocab_is_a_usage_error(files):
    proc = run("count", str(files["english"]))
    assert proc.returncode == 2
    assert "--vocab" in proc.stderr
    assert proc.stdout == ""


def test_vocabs_lists_the_vocabularies():
    proc = run("vocabs")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert set(NAMES) <= set(listed)
    for line in proc.stdout.splitlines():
        if line.split()[0] in NAMES:
            assert "installed" in line
            assert "missing" not in line


def test_missing_package_is_shown_and_skipped_in_process(monkeypatch, capsys, meters, files):
    # A vocabulary whose package is not installed: 'vocabs' names the package to install,
    # 'count --vocab all' skips it, and naming it gives the one-line error.
    from tokenhub import cli

    phantom = vocabs.VocabSpec(
        "phantom", "tokenhub-phantom-vocabulary", "data/phantom.tiktoken", "tiktoken", "openai"
    )
    monkeypatch.setitem(vocabs.VOCABS, "phantom", phantom)

    assert cli.main(["vocabs"]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("phantom")]
    assert "pip install tokenhub-phantom-vocabulary" in line

    path = files["english"]
    assert cli.main(["count", "--vocab", "all", "--json", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "phantom" not in result["vocab"]
    text = path.read_text(encoding="utf-8")
    assert result["total_tokens"] == {name: meters[name].count(text) for name in result["vocab"]}

    assert cli.main(["count", "--vocab", "phantom", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("tokenhub: error: ")
    assert "pip install tokenhub-phantom-vocabulary" in captured.err
