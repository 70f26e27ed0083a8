"""What the CLI prints of names and text: unambiguous, copyable, aligned."""

from __future__ import annotations

import subprocess
import sys

import pytest

from keyledger.cli.render import _width, emit_json, emit_json_pages, shell_word, shown


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("秘密の鍵", "秘密の鍵"),
        ("db\u200bpass", "db\\u200bpass"),
        ("str\u00adipe", "str\\u00adipe"),
        ("acme\u202etxt.exe", "acme\\u202etxt.exe"),
        ("db\\u200bpass", "db\\\\u200bpass"),  # a literal backslash is not an escape
        ("tab\there", "tab\\u0009here"),
    ],
)
def test_shown_escapes_what_prints_nothing_or_reorders_text(value: str, expected: str) -> None:
    assert shown(value) == expected


def test_two_names_never_show_alike() -> None:
    names = ["db\u200bpass", "db\\u200bpass", "dbpass", "db\\\\u200bpass"]
    assert len({shown(name) for name in names}) == len(names)


@pytest.mark.parametrize(
    "value", ["acme", "o'neil", "acme\u00a0corp", "ac\u200bme", "a\\b\u202ec", "秘密 鍵"]
)
def test_a_shell_word_is_the_value_in_bash(value: str) -> None:
    done = subprocess.run(
        ["bash", "-c", f"printf %s {shell_word(value)}"],
        capture_output=True,
        env={"LC_ALL": "C.UTF-8"},
        check=True,
    )
    assert done.stdout.decode("utf-8") == value


@pytest.mark.parametrize(
    ("cell", "columns"),
    [("plain", 5), ("秘密の鍵", 8), ("ที่นี่", 2), ("नमस्ते", 4), ("e\u0301", 1)],
)
def test_width_counts_terminal_columns(cell: str, columns: int) -> None:
    assert _width(cell) == columns


@pytest.mark.parametrize(
    "char", ["\u034f", "\u115f", "\u17b4", "\u180b", "\u3164", "\ufe0f", "\uffa0", "\U000e0100"]
)
def test_printable_characters_that_show_nothing_are_escaped_too(char: str) -> None:
    assert char not in shown(f"ops{char}-alice")
    assert char not in shell_word(f"ops{char}-alice").replace("\\", "")


@pytest.mark.parametrize(
    "pages",
    [[], [[]], [[{"a": 1}]], [[{"a": 1}, {"b": [1, {"c": "é\u200b"}]}], [], [{"d": None}]]],
)
def test_json_written_in_pages_is_the_json_of_the_whole_list(
    pages: list[list[object]], capsys: pytest.CaptureFixture[str]
) -> None:
    emit_json_pages(pages)
    paged = capsys.readouterr().out
    emit_json([item for page in pages for item in page])
    assert paged == capsys.readouterr().out


def test_keyledger_warnings_of_a_cli_process_are_escaped_onto_one_line() -> None:
    """A warning (an audit catch-up deferred) quoted a driver's message that quoted text
    planted in the store: Python's last-resort handler sent its escape sequences to the
    terminal (found by review). The CLI, whose logging nobody configures, escapes them."""
    script = (
        "import logging\n"
        "from keyledger.cli.errors import _log_safely\n"
        "_log_safely()\n"
        "logging.getLogger('keyledger.application.ledger').warning("
        "'deferred: %s', '\\x1b]0;PWNED\\x07\\nNo tampering found.')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stderr == "deferred: \\u001b]0;PWNED\\u0007\\u000aNo tampering found.\n"
