"""Setting up a queue: its runner and options, links to it, a plugin runner's module."""

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
    created = False
    if not only_links:
        if existing is not None and not force:
            raise AgentError(
                ERR_QUEUE, "A queue already exists at %s (use --force to reconfigure it)" % root
            )
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
        "runner": runner,
        "links": paths,
        "batch_systems": batch_systems(),
    }


def _is_runner_name(name):
    import re

    return re.match(RUNNER_NAME_REGEX, name) is not None


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
