"""The bootstrap's stage two, run on the server: load execnet and the agent, then serve.

This file is sent as source (tej.bootstrap) and run in stage one's namespace,
followed by a call ``tej_boot(GATEWAY, BUNDLE)`` with this connection's values:
GATEWAY is (module name, digest) of execnet's gateway_base, BUNDLE is (name,
{relpath: digest}) of the agent's bundle (tej.server.bundle). Both are taken
from a private cache on the server when they are there intact (a file owned
by this user, writable by nobody else, with the right digest), else their
sources are asked for and written to the cache (best effort: a read-only or
full home runs them from memory). Python 3.8+, standard library only; nothing
runs when the file is merely imported.

The bundle is imported as a package named after it, whose folder is not put on
sys.path: a file of the bundle can't shadow a module of the standard library.
"""

import os
import stat
import sys

# -- stage two ------------------------------------------------------------------------
# The part of this file that is compiled on every connection (tej.bootstrap sends it,
# then a call of tej_stage_two): it runs the whole file from the server's cache, where
# Python keeps it compiled, else from the source sent with it (and caches it).

#: Where the server keeps its cache of tej's code, under $XDG_CACHE_HOME or ~/.cache.
CACHE_DIR_NAME = "tej"
#: Cache entries not rewritten for this long are removed (when the cache is written to).
CACHE_MAX_AGE = 30 * 86400
#: This file's name in the server's cache (tej_loader_DIGEST), once stage two has run it.
LOADER_NAME = None


def tej_stage_two(source, name, call):
    """Run this whole file (source) as the module name, compiled from the cache if it is
    there, and boot: tej_boot(*call)."""
    cache = tej_cache_dir()
    module = None
    if cache is not None:
        module = tej_cached_loader(os.path.join(cache, name + ".py"), name, source)
    if module is None:
        module = type(sys)(name)
        exec(compile(source, name, "exec"), module.__dict__)
        if cache is not None:
            try:
                module.tej_write_file(os.path.join(cache, name + ".py"), source.encode("utf-8"))
            except Exception:  # a read-only or full cache: compiled from the source each time
                pass
    module.__dict__["LOADER_NAME"] = name  # kept when the cache is pruned
    module.tej_boot(*call)


def tej_cached_loader(path, name, source):
    """This file from the cache at path, if it is ours, private and the same as source."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as stream:
            info = os.fstat(stream.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                return None
            if info.st_mode & 0o022 or stream.read() != source.encode("utf-8"):
                return None
        module = type(sys)(name)
        module.__file__ = path
        tej_machinery("SourceFileLoader")(name, path).exec_module(module)
        return module
    except Exception:  # damaged (its compiled copy too): compiled from the source instead
        try:
            from importlib.util import cache_from_source

            os.unlink(cache_from_source(path))  # a damaged compiled copy, written again
        except Exception:  # none
            pass
        return None


def tej_machinery(name):
    """A class of importlib.machinery (SourceFileLoader, ModuleSpec), taken from the modules
    the interpreter has loaded already: importlib.machinery would load importlib and warnings."""
    for module in ("_frozen_importlib_external", "_frozen_importlib"):
        found = getattr(sys.modules.get(module), name, None)
        if found is not None:
            return found
    import importlib.machinery

    return getattr(importlib.machinery, name)


def tej_cache_dir():
    """The private cache folder, made if missing; None if it can't be had safely."""
    try:
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):
            base = os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, CACHE_DIR_NAME)
        if not os.path.isabs(path):
            return None  # no home folder
        try:
            if not os.path.isdir(base):
                os.makedirs(base, 0o700)
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # whatever the umask
        except OSError:
            pass
        info = os.lstat(path)
        # Code is imported from it: only a folder of ours that nobody else can even enter
        # (so that nothing in it, compiled copies included, can be someone else's doing).
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return None
        return None if info.st_mode & 0o077 else path
    except Exception:  # no cache, whatever the reason: the source is sent instead
        return None


# -- end of stage two -------------------------------------------------------------------


def tej_sha256(data):
    """The SHA-256 of data in hex, from the built-in module (no OpenSSL to load)."""
    try:
        from _sha2 import sha256  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        try:
            from _sha256 import sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ImportError:
            from hashlib import sha256  # type: ignore[assignment,unused-ignore]
    return sha256(data).hexdigest()


def tej_intact(path, digest):
    """Whether the file at path is ours, writable only by us, and has that digest."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        with os.fdopen(fd, "rb") as stream:
            info = os.fstat(stream.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                return False
            if info.st_mode & 0o022:
                return False
            return tej_sha256(stream.read()) == digest
    except Exception:  # a damaged or vanished copy: the source is sent instead
        return False


def tej_import(name, path):
    """Import the file at path as module name (Python caches its compiled form)."""
    loader = tej_source_loader(name, path)
    module = type(sys)(name)
    module.__file__ = path
    module.__loader__ = loader
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def tej_run_source(name, source):
    """Run a module's source from memory (when it can't be cached)."""
    module = type(sys)(name)
    sys.modules[name] = module
    exec(compile(source, name, "exec"), module.__dict__)
    return module


def tej_write_file(path, data):
    """Write a private file atomically (temporary file, then rename)."""
    temporary = "%s.tmp-%d" % (path, os.getpid())
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(temporary, flags, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def tej_remove_tree(path):
    """Remove a file or a folder tree, ignoring what is already gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def tej_prune(cache, keep):
    """Remove what older versions of tej left in the cache (files and bundle folders)."""
    import time

    limit = time.time() - CACHE_MAX_AGE
    for folder in (cache, os.path.join(cache, "__pycache__")):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for entry in names:
            if entry.split(".")[0] in keep or entry == "__pycache__":
                continue
            path = os.path.join(folder, entry)
            try:
                if os.lstat(path).st_mtime < limit:
                    tej_remove_tree(path)
            except OSError:
                pass


class TejLazyModule(type(sys)):  # type: ignore[misc]
    """A module that is imported when first used, not when a module imports it."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.tej_real(), attr)

    def tej_real(self):
        """The module itself, imported now (and put in sys.modules in this one's place)."""
        if sys.modules.get(self.__name__) is self:
            sys.modules.pop(self.__name__, None)
        real = __import__(self.__name__)
        self.__dict__.update(real.__dict__)
        return real


class TejProtocol(object):
    """Stands for typing.Protocol as a base class (see tej_typing_stand_in)."""


def tej_typing_stand_in():
    """What execnet's gateway_base uses of typing as it runs, without loading typing.

    It needs a base class for its protocols, overload and cast; the rest is in
    annotations, which it doesn't evaluate. Anything else makes its import fail,
    and it is imported again with typing itself.
    """
    module = type(sys)("typing")
    module.TYPE_CHECKING = False  # type: ignore[attr-defined]
    module.Protocol = TejProtocol  # type: ignore[attr-defined]
    module.overload = lambda function: function  # type: ignore[attr-defined]
    module.cast = lambda kind, value: value  # type: ignore[attr-defined]
    for name in ("Any", "Callable", "Iterator", "Literal", "MutableSet"):
        setattr(module, name, None)  # in annotations only
    return module


def tej_gateway_from_cache(path):
    """execnet's gateway_base from the cache (path, found intact), without what it needs
    only rarely.

    It imports traceback (with linecache, tokenize, textwrap...) only to format
    errors, binding format_exception as a default argument, and typing only for
    its annotations: they would take a quarter of the server's start-up. So
    traceback stands in until it is used, and typing while gateway_base loads.
    """
    name = os.path.basename(path)[: -len(".py")]
    if "traceback" not in sys.modules:
        lazy = sys.modules["traceback"] = TejLazyModule("traceback")
        lazy.format_exception = lambda *args, **kwargs: lazy.tej_real().format_exception(
            *args, **kwargs
        )
    if "typing" in sys.modules:
        return tej_import(name, path)
    stand_in = sys.modules["typing"] = tej_typing_stand_in()
    try:
        return tej_import(name, path)
    except Exception:  # it needs more of typing than the stand-in has
        if sys.modules.pop("typing", None) is not stand_in:
            raise
        return tej_import(name, path)
    finally:
        if sys.modules.get("typing") is stand_in:
            del sys.modules["typing"]


def tej_gateway_from_source(cache, name, source):
    """execnet's gateway_base from its source: written to the cache and imported, or just run."""
    if cache is not None:
        path = os.path.join(cache, name + ".py")
        try:
            tej_write_file(path, source.encode("utf-8"))
            return tej_import(name, path)
        except Exception:  # a read-only or full disk: run it from memory
            pass
    return tej_run_source(name, source)


#: In a bundle's folder: what its files were (inode, size, times) when last found intact.
STAMP_FILE = ".tej-intact"


def tej_file_stamp(path, digest):
    """A line naming the file at path as it is now, with its digest; None if it isn't ours.

    The change time can't be set back by anyone (utime moves it too), so a file
    whose line is the same has not been written to since.
    """
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        return None
    fields = (digest, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_mode)
    return "%s %d %d %d %d %o" % fields


def tej_stamp_lines(folder, digests):
    """The stamp of the bundle's files in folder, one line each (None if one isn't ours)."""
    lines = []
    for path in sorted(digests):
        line = tej_file_stamp(os.path.join(folder, path), digests[path])
        if line is None:
            return None
        lines.append("%s %s\n" % (path, line))
    return "".join(lines)


def tej_bundle_intact(folder, digests):
    """Whether every file of the bundle is in folder, ours and intact.

    Hashing the bundle's files costs a connection milliseconds: once they are
    found intact, their stamp (STAMP_FILE) is kept, and while every file is
    as stamped (a stat each), they are not read again.
    """
    stamp_path = os.path.join(folder, STAMP_FILE)
    now = tej_stamp_lines(folder, digests)
    if now is None:
        return False
    try:
        fd = os.open(stamp_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as stream:
            info = os.fstat(stream.fileno())
            mine = stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
            if mine and not info.st_mode & 0o022 and stream.read() == now.encode("utf-8"):
                return True
    except OSError:
        pass
    if not all(tej_intact(os.path.join(folder, path), digests[path]) for path in digests):
        return False
    tej_stamp(folder, digests)
    return True


def tej_stamp(folder, digests):
    """Write the stamp of the bundle's files in folder, as they are now (best effort)."""
    lines = tej_stamp_lines(folder, digests)
    try:
        if lines is not None:
            tej_write_file(os.path.join(folder, STAMP_FILE), lines.encode("utf-8"))
    except Exception:  # a read-only cache: the files are hashed on every connection
        pass


def tej_write_bundle(cache, name, sources):
    """Write a bundle's folder into the cache, whole: built aside, then renamed into place."""
    folder = os.path.join(cache, name)
    building = "%s.tmp-%d" % (folder, os.getpid())
    tej_remove_tree(building)
    try:
        for path in sorted(sources):
            parent = os.path.dirname(os.path.join(building, path))
            if not os.path.isdir(parent):
                os.makedirs(parent, 0o700)
                os.mkdir(os.path.join(parent, "__pycache__"), 0o700)
            tej_write_file(os.path.join(building, path), sources[path].encode("utf-8"))
        if os.path.lexists(folder):  # a damaged copy
            tej_remove_tree(folder)
        os.rename(building, folder)
    finally:
        tej_remove_tree(building)
    return folder


def tej_source_loader(name, path):
    """A loader of the source file at path that replaces a damaged compiled copy of it.

    Python trusts a compiled copy whose header matches the source's size and time;
    one damaged behind that header would fail every import until it is removed.
    """
    SourceFileLoader = tej_machinery("SourceFileLoader")

    class TejSourceLoader(SourceFileLoader):  # type: ignore[misc,valid-type]
        def get_code(self, fullname):
            try:
                return SourceFileLoader.get_code(self, fullname)
            except (ValueError, EOFError, TypeError, ImportError):  # bad marshal data
                from importlib.util import cache_from_source

                try:
                    os.unlink(cache_from_source(self.path))
                except OSError:
                    pass
                return SourceFileLoader.get_code(self, fullname)

    return TejSourceLoader(name, path)


class TejBundleFinder(object):
    """Finds the bundle's modules (the package `name`): in its folder, or in memory."""

    def __init__(self, name, folder, sources):
        self.name = name
        self.folder = folder
        self.sources = sources

    def find_spec(self, fullname, path=None, target=None):
        """The spec of a module of the bundle, or None for any other."""
        if not fullname.startswith(self.name + "."):
            return None
        relative = fullname[len(self.name) + 1 :].replace(".", "/")
        for file, package in ((relative + "/__init__.py", True), (relative + ".py", False)):
            if self.folder is not None and os.path.isfile(os.path.join(self.folder, file)):
                return self.spec(fullname, file, package, os.path.join(self.folder, file))
            if self.folder is None and file in self.sources:
                return self.spec(fullname, file, package, None)
        return None

    def spec(self, fullname, file, package, path):
        """A module's spec: from its file at path, or from memory (path None).

        Made by hand, as importlib.util's spec_from_file_location would make it:
        importlib.util (and contextlib, which it loads) would cost every connection
        a millisecond.
        """
        ModuleSpec = tej_machinery("ModuleSpec")
        if path is None:
            spec = ModuleSpec(fullname, self, origin=file, is_package=package)
            if package:
                spec.submodule_search_locations = []
            return spec
        loader = tej_source_loader(fullname, path)
        spec = ModuleSpec(fullname, loader, origin=path, is_package=package)
        spec.has_location = True  # so __file__ and __cached__ are set from it
        if package:
            spec.submodule_search_locations = [os.path.dirname(path)]
        return spec

    def create_module(self, spec):
        """The default module object."""
        return None

    def exec_module(self, module):
        """Run a module's source from memory."""
        origin = module.__spec__.origin
        code = compile(self.sources[origin], "%s/%s" % (self.name, origin), "exec")
        exec(code, module.__dict__)


def tej_bundle_package(name, folder, sources):
    """Make the bundle importable as the package `name`: from folder, or from sources.

    Nothing is put on sys.path: only the package's own modules are looked up there.
    """
    package = type(sys)(name)
    package.__path__ = [folder] if folder else []
    if folder is None:
        package.tej_sources = dict(  # type: ignore[attr-defined]
            (path, text.encode("utf-8")) for path, text in sources.items()
        )
    sys.meta_path.insert(0, TejBundleFinder(name, folder, sources))
    sys.modules[name] = package
    return package


def tej_agent(bundle_name):
    """The agent's entry point (remote_agent) in the bundle, imported."""
    name = bundle_name + ".remote_agent"
    __import__(name)
    return sys.modules[name]


def tej_boot(gateway, bundle, ahead=()):
    """Load gateway_base and the agent's bundle, asking for the sources of what isn't cached;
    answer the requests that came with the bootstrap; then serve.

    ahead names the operations the client will likely send first: what they need is
    imported before the requests are read, which may still be on their way.
    """
    cache = tej_cache_dir()
    gateway_name, gateway_digest = gateway
    bundle_name, digests = bundle
    cached = os.path.join(cache, gateway_name + ".py") if cache else None
    if cached is not None and not tej_intact(cached, gateway_digest):
        cached = None
    folder = os.path.join(cache, bundle_name) if cache else None
    if folder is not None and not tej_bundle_intact(folder, digests):
        folder = None
    missing = ([] if cached else [gateway_name]) + ([] if folder else [bundle_name])
    sys.stdout.write("TEJ-CACHE%s\n" % "".join(" " + name for name in missing))
    sys.stdout.flush()
    if not missing:
        tej_bundle_package(bundle_name, folder, None)
        tej_agent(bundle_name).prepare(["hello", *ahead])
    early = eval(sys.stdin.readline())  # the session's first requests (or None)
    sources, base = {}, None
    if missing:
        sources = eval(sys.stdin.readline())
        if cached is None:
            base = tej_gateway_from_source(cache, gateway_name, sources[gateway_name])
        if folder is None and cache is not None:
            try:
                folder = tej_write_bundle(cache, bundle_name, sources[bundle_name])
                tej_stamp(folder, digests)
            except Exception:  # a read-only or full disk: run it from memory
                folder = None
        if cache is not None:
            tej_prune(cache, [gateway_name, bundle_name, LOADER_NAME])
        tej_bundle_package(bundle_name, folder, sources.get(bundle_name))
    agent = tej_agent(bundle_name)
    # The answers go before execnet is even loaded: a command that needs no more is done.
    answers = agent.answer(early) if early else b"TEJ-EARLY None\n"
    sys.stdout.flush()
    sys.stdout.buffer.write(answers + b"1")
    sys.stdout.buffer.flush()
    if base is None:
        base = tej_gateway_from_cache(cached)
    io = base.init_popen_io(base.get_execmodel("thread"))
    base.serve(io, id="tej-agent")
    # The client has closed the session: end now, without the interpreter's cleanup,
    # which the client would wait for (supervisors are detached: they go on).
    sys.stderr.flush()
    os._exit(0)
