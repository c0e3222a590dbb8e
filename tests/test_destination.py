"""Parsing destinations and building the command that starts the agent (pure, no ssh)."""

from __future__ import annotations

import shlex
import sys

import pytest

from tej.destination import (
    ConnectOptions,
    Destination,
    agent_command,
    parse_destination,
    ssh_command,
)
from tej.errors import InvalidInput

BOOTSTRAP = "import sys;exec(eval(sys.stdin.readline()))"


def option_value(argv: list[str], name: str) -> str:
    """The value given to ``-o NAME=VALUE`` in an ssh argv; fails if absent."""
    values = [
        word.split("=", 1)[1]
        for flag, word in zip(argv, argv[1:])
        if flag == "-o" and word.startswith(name + "=")
    ]
    assert len(values) == 1, f"expected one -o {name}=... in {argv}"
    return values[0]


def flag_value(argv: list[str], flag: str) -> str:
    """The word after a flag such as ``-p`` in the options part of an ssh argv."""
    options = argv[: argv.index("--")]
    assert options.count(flag) == 1, f"expected one {flag} in {argv}"
    return options[options.index(flag) + 1]


@pytest.mark.parametrize(
    ("text", "host", "user", "port"),
    [
        ("host", "host", None, None),
        ("user@host", "host", "user", None),
        ("my-alias.lab", "my-alias.lab", None, None),
        ("ssh://host", "host", None, None),
        ("ssh://user@host:2222", "host", "user", 2222),
        ("ssh://[::1]:2222", "::1", None, 2222),
        ("ssh://[::1]", "::1", None, None),
        ("ssh://u@10.0.0.1:22", "10.0.0.1", "u", 22),
    ],
)
def test_parse_ssh_destinations(text: str, host: str, user: str | None, port: int | None) -> None:
    assert parse_destination(text) == Destination(host=host, user=user, port=port)
    assert not parse_destination(text).is_local


def test_parse_local() -> None:
    destination = parse_destination("local")
    assert destination.is_local
    assert str(destination) == "local"


@pytest.mark.parametrize(
    "text",
    [
        "-oProxyCommand=x",
        "a b",
        "user@",
        "@host",
        "-l@host",
        "user@-host",
        "ssh://h:0",
        "ssh://h:99999",
        "ssh://h:abc",
        "ssh://u:pw@h",
        "ssh://-oProxyCommand=x",
        "ssh://h/path",
        "ssh://",
        "host;rm",
        "$(id)",
        "",
    ],
)
def test_bad_destinations_are_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_destination(text)


@pytest.mark.parametrize("text", ["ssh://[::1", "ssh://h:\N{SUPERSCRIPT TWO}"])
def test_malformed_urls_are_invalid_input_not_crashes(text: str) -> None:
    """Unbalanced brackets and odd digits must give InvalidInput, not a ValueError."""
    with pytest.raises(InvalidInput):
        parse_destination(text)


@pytest.mark.parametrize("text", ["host", "user@host", "ssh://user@host:2222", "ssh://[::1]:22"])
def test_destination_str_round_trips(text: str) -> None:
    assert str(parse_destination(text)) == text
    assert parse_destination(str(parse_destination(text))) == parse_destination(text)


def test_agent_command_for_ssh_has_safe_options() -> None:
    destination = parse_destination("ssh://alice@example.org:2222")
    options = ConnectOptions(connect_timeout=7, keepalive_interval=4, keepalive_count=2)
    argv = agent_command(destination, options, BOOTSTRAP)
    assert argv[0] == "ssh"
    assert option_value(argv, "BatchMode") == "yes"
    assert option_value(argv, "ConnectTimeout") == "7"
    assert option_value(argv, "ServerAliveInterval") == "4"
    assert option_value(argv, "ServerAliveCountMax") == "2"
    assert flag_value(argv, "-p") == "2222"
    assert flag_value(argv, "-l") == "alice"
    assert "-F" not in argv[: argv.index("--")]
    assert argv[-3:-1] == ["--", "example.org"]


def test_agent_command_without_user_or_port_omits_them() -> None:
    argv = agent_command(parse_destination("host"), ConnectOptions(), BOOTSTRAP)
    options = argv[: argv.index("--")]
    assert "-p" not in options
    assert "-l" not in options
    assert argv[-2] == "host"


def test_host_that_looks_like_an_option_stays_after_double_dash() -> None:
    """Even a host built by hand comes after ``--``, so ssh can't read it as an option."""
    argv = ssh_command(Destination(host="-oProxyCommand=x"), ConnectOptions())
    assert argv[-2:] == ["--", "-oProxyCommand=x"]


def test_agent_command_uses_given_ssh_config() -> None:
    argv = agent_command(
        parse_destination("host"), ConnectOptions(ssh_config="/etc/tej/ssh_config"), BOOTSTRAP
    )
    assert flag_value(argv, "-F") == "/etc/tej/ssh_config"


def test_agent_command_expands_home_in_ssh_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/tester")
    argv = agent_command(parse_destination("host"), ConnectOptions(ssh_config="~/cfg"), BOOTSTRAP)
    assert flag_value(argv, "-F") == "/home/tester/cfg"


@pytest.mark.parametrize(
    ("python", "words"),
    [
        (None, ["python3"]),
        ("/opt/my python/bin/python3 -u", None),
        ("'/opt/my python/bin/python3' -u", ["/opt/my python/bin/python3", "-u"]),
    ],
)
def test_remote_command_quotes_python_words(python: str | None, words: list[str] | None) -> None:
    bootstrap = "print('it''s'); x = \"$HOME\" ; `id` | cat"
    argv = agent_command(parse_destination("host"), ConnectOptions(python=python), bootstrap)
    expected = (words if words is not None else shlex.split(python or "")) + ["-S", "-c", bootstrap]
    assert shlex.split(argv[-1]) == expected


def test_local_command_runs_python_directly() -> None:
    argv = agent_command(parse_destination("local"), ConnectOptions(), BOOTSTRAP)
    assert argv == [sys.executable, "-S", "-c", BOOTSTRAP]


@pytest.mark.parametrize("python", ["'unbalanced", "   "])
def test_bad_python_option_is_invalid_input(python: str) -> None:
    with pytest.raises(InvalidInput):
        agent_command(parse_destination("host"), ConnectOptions(python=python), BOOTSTRAP)
