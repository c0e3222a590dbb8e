"""Setting up a queue: its runner and options, links to it, a plugin runner's module."""

import os

from ...protocol import (
    BUILTIN_RUNNERS,
    DEFAULT_RUNNER,
    ERR_BAD_REQUEST,
    ERR_INVALID,
    ERR_QUEUE,
    RUNNER_NAME_REGEX,
)
from ..errors import AgentError
from ..files import remove_tree, write_json_atomic
from ..layout import LOCK_FILE, QUEUE_CONFIG
from ..queue import (
    QueueLock,
    create_queue,
    link_location,
    open_queue,
    read_queue_config,
    resolve_queue_path,
    write_link,
)
from ..runners import (
    DefaultRunner,
    batch_systems,
    builtin_module,
    check_runner_change,
    configure_runner,
    install_plugin,
    runner_tick,
)


def setup(
    connection,
    queue,
    links=(),
    runner=DEFAULT_RUNNER,
    force=False,
    only_links=False,
    runner_source=None,
    options=None,
):
    """Create or reconfigure a queue and make links to it.

    An existing queue already set up with this runner and options is left
    alone ("unchanged" in the reply); another runner or options need force.

    A plugin runner (neither default nor built in) comes with its source, which
    is installed in the queue; options are the runner's settings (names to strings).
    """
    if not isinstance(links, (list, tuple)):
        raise AgentError(ERR_BAD_REQUEST, "links must be a list")
    if not isinstance(runner, str) or not _is_runner_name(runner):
        raise AgentError(ERR_INVALID, "Invalid plugin name %r" % (runner,))
    if runner not in (DEFAULT_RUNNER,) + BUILTIN_RUNNERS and not isinstance(runner_source, str):
        raise AgentError(ERR_INVALID, "Unknown plugin %r" % (runner,))
    root = resolve_queue_path(queue)
    existing = read_queue_config(root)
    paths = [link_location(link, root, force) for link in links]
    created = unchanged = False
    if not only_links and existing is not None and not force:
        changes = setup_changes(open_queue(root, with_runner=False), runner, runner_source, options)
        if changes:
            raise AgentError(
                ERR_QUEUE,
                "A queue already exists at %s with other settings (%s): use --force to "
                "reconfigure it" % (root, "; ".join(changes)),
            )
        unchanged = True  # set up as asked already: left alone, only the links are made
    elif not only_links:
        if existing is not None:
            check_runner_change(open_queue(root, with_runner=False), runner)
        else:
            create_queue(root)
            created = True
        try:
            configure_queue(open_queue(root, with_runner=False), runner, runner_source, options)
        except BaseException:
            if created:
                remove_tree(root)
            raise
        runner_tick(open_queue(root))  # a higher max_running starts waiting jobs now
    for path in paths:
        write_link(path, root)
    return {
        "queue": root,
        "created": created,
        "unchanged": unchanged,
        "runner": runner,
        "links": paths,
        "batch_systems": batch_systems(),
    }


def _is_runner_name(name):
    import re

    return re.match(RUNNER_NAME_REGEX, name) is not None


def setup_changes(queue, runner, source, options):
    """What setting up an existing queue with this runner and options would change (a list)."""
    current = queue.config.get("runner") or DEFAULT_RUNNER
    if runner != current:
        return ["its runner would change from %r to %r" % (current, runner)]
    if runner == DEFAULT_RUNNER:
        module = DefaultRunner
    elif runner in BUILTIN_RUNNERS:
        module = builtin_module(runner)
    else:
        from ...protocol import sha256_hex
        from ..layout import AGENT_DIR
        from ..runners import load_plugin_module, plugin_module_name

        name = plugin_module_name(runner, sha256_hex(source.encode("utf-8"))[:16])
        path = queue.path(AGENT_DIR, "%s.py" % name)
        if queue.config.get("runner_module") != name or not os.path.isfile(path):
            return ["the code of the plugin %r would change" % runner]
        module = load_plugin_module(path, name)
    wanted = configure_runner(module, runner, options or {})
    had = queue.config.get("options") or {}
    return [
        "option %s would change from %s to %s"
        % (key, _shown(had.get(key, None)), _shown(wanted.get(key, None)))
        for key in sorted(set(had) | set(wanted))
        if had.get(key, None) != wanted.get(key, None)
    ]


def _shown(value):
    return "(unset)" if value is None else repr(value)


def configure_queue(queue, runner, source, options):
    """Give a queue its runner (installing a plugin's module), with its checked options."""
    config = dict(queue.config, runner=runner)
    config.pop("runner_module", None)
    if runner == DEFAULT_RUNNER:
        module = DefaultRunner
    elif runner in BUILTIN_RUNNERS:
        module = builtin_module(runner)
    else:
        config["runner_module"], module = install_plugin(queue, runner, source)
    config["options"] = configure_runner(module, runner, options or {})
    write_json_atomic(queue.path(QUEUE_CONFIG), config)


def install_runner(connection, queue, runner, source):
    """Install the module of the plugin runner a queue uses (its copy was missing)."""
    if not isinstance(source, str) or not isinstance(runner, str):
        raise AgentError(ERR_BAD_REQUEST, "runner and source must be strings")
    found = open_queue(queue, with_runner=False)
    if not found.exists or found.config.get("runner") != runner or runner in BUILTIN_RUNNERS:
        raise AgentError(ERR_QUEUE, "This queue does not use the plugin runner %r" % runner)
    with QueueLock(found.path(LOCK_FILE)):
        module_name, _ = install_plugin(found, runner, source)
        config = dict(read_queue_config(found.root), runner_module=module_name)
        write_json_atomic(found.path(QUEUE_CONFIG), config)


HANDLERS = {"setup": setup, "install_runner": install_runner}
