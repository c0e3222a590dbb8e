"""The `tej` command's entry point: start connecting, then load the command line.

Loading the command line (click, the API, execnet) takes a good part of a short
command's time, and so does starting the agent on the server. For a queue
command written the usual way (`tej COMMAND DESTINATION [options]`), the agent's
process is started first, from a quick look at the arguments, and the real
command line then takes it over (see tej.bootstrap.prestart): both happen at the
same time. The look is only a guess: the session takes the process over only if
it would have started exactly the same command, and a process nobody took over
(a mistake in the arguments, --help) is ended when the command ends. Nothing
but tej's own code is sent before the arguments are checked.
"""

from __future__ import annotations

import os
import sys

QUEUE_COMMANDS = (
    "setup",
    "submit",
    "wait",
    "logs",
    "status",
    "list",
    "kill",
    "delete",
    "download",
    "sync",
    "resubmit",
    "prune",
)
#: The first request of the commands that send one of tej.protocol.EARLY_OPERATIONS first:
#: the agent is told, and imports what answering it needs ahead (see tej.bootstrap.start).
FIRST_OPERATIONS = {"status": "status", "list": "list", "sync": "sync_list"}
#: The options that decide how the agent is started, and their environment variables.
CONNECTION_OPTIONS = {
    "--python": "TEJ_PYTHON",
    "--ssh-config": "TEJ_SSH_CONFIG",
    "--connect-timeout": "TEJ_CONNECT_TIMEOUT",
    "--persist": "TEJ_PERSIST",
}
#: Set while the shell asks click for completions (see tej.cli.main): nothing to start.
COMPLETE_VARIABLE = "_TEJ_COMPLETE"
TRUE_WORDS = ("1", "true", "t", "yes", "y", "on")
FALSE_WORDS = ("", "0", "false", "f", "no", "n", "off")


def main() -> None:
    """Run the `tej` command line."""
    try:
        _prestart(sys.argv[1:])
        from tej.cli import main as cli_main

        cli_main()
    except SystemExit as exc:
        _exit(exc)
        raise
    finally:
        from tej.bootstrap import discard_prestarted

        discard_prestarted()


def _exit(exc: SystemExit) -> None:
    """End the process now, as SystemExit would, without the interpreter's cleanup.

    Tearing down every module takes a short command a good part of its time, for
    nothing: its sessions are closed. Returns (the caller raises exc as usual) if
    anything might need that cleanup: output that can't be flushed, a thread.
    """
    import atexit
    import threading

    from tej.bootstrap import discard_prestarted

    discard_prestarted()
    others = [thread for thread in threading.enumerate() if thread is not threading.main_thread()]
    if any(thread.is_alive() and not thread.daemon for thread in others):
        return
    code = exc.code
    if code is not None and not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - then the usual exit reports it
        return
    os._exit(code or 0)


def connection_arguments(args: list[str]) -> dict[str, str | bool] | None:
    """The destination and connection options of a queue command, as given on the
    command line or in the environment; None if unsure."""
    if len(args) < 2 or args[0] not in QUEUE_COMMANDS or args[1].startswith("-"):
        return None
    if os.environ.get(COMPLETE_VARIABLE):
        return None
    found: dict[str, str | bool] = {"destination": args[1]}
    for option, variable in CONNECTION_OPTIONS.items():
        if os.environ.get(variable):  # click ignores empty ones
            found[option] = os.environ[variable]
    reuse = os.environ.get("TEJ_NO_REUSE", "").lower()
    if reuse not in TRUE_WORDS + FALSE_WORDS:
        return None
    if reuse:
        found["--no-reuse"] = reuse in TRUE_WORDS
    rest = iter(args[2:])
    for arg in rest:
        name, equals, value = arg.partition("=")
        if arg in ("--", "-h", "--help"):
            return None
        if arg in ("--no-reuse", "--reuse"):
            found["--no-reuse"] = arg == "--no-reuse"
        elif name in CONNECTION_OPTIONS:
            found[name] = value if equals else next(rest, "")
    return found


def given_settings(found: dict[str, str | bool]) -> dict[str, object] | None:
    """The settings in found (see connection_arguments), as tej.config names them; None if
    one is invalid (the command line will say so)."""
    given: dict[str, object] = {}
    for option, value in found.items():
        name = option.lstrip("-").replace("-", "_")
        if name in ("connect_timeout", "persist"):
            if not str(value).isdigit():
                return None
            given[name] = int(value)
        elif name != "destination":
            given[name] = value
    return given


def _prestart(args: list[str]) -> None:
    """Start the agent for the command in args, if it is clear enough which one."""
    found = connection_arguments(args)
    if found is None:
        return
    given = given_settings(found)
    if given is None:
        return
    from tej import config
    from tej.bootstrap import prestart
    from tej.destination import parse_destination

    destination = str(found["destination"])
    try:
        options = config.resolve(destination, given).connect_options()
        ahead = (FIRST_OPERATIONS[args[0]],) if args[0] in FIRST_OPERATIONS else ()
        prestart(parse_destination(destination), options, ahead)
    except Exception:  # noqa: BLE001 - the command line will say what is wrong
        pass
