"""A job's resource use: the kernel's figures when it ends, its live use from /proc."""

import os
import sys

from .processes import owns_group

SOURCE_TEJ = "tej"  # the supervisor's figures: getrusage of the job and what it waited for
SOURCE_PROC = "proc"  # a running job's current use, summed over its process group


def children_usage():
    """The kernel's figures for this process's reaped children (and what they reaped).

    {"max_rss": bytes (the largest one's peak), "cpu_user", "cpu_system": seconds}.
    """
    import resource

    return usage_figures(resource.getrusage(resource.RUSAGE_CHILDREN))


def usage_figures(usage):
    """children_usage's figures of a resource usage (getrusage's, or wait4's of one child)."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes elsewhere
    return {
        "max_rss": int(usage.ru_maxrss) * scale,
        "cpu_user": usage.ru_utime,
        "cpu_system": usage.ru_stime,
    }


def job_resources(before):
    """A supervisor's record of its job's use, once the job and its orphans are reaped.

    before: children_usage() taken before the job started, whose CPU time (forks
    made for the queue meanwhile) is not the job's.
    """
    after = children_usage()
    return {
        "max_rss": after["max_rss"],
        "cpu_user": round(max(0.0, after["cpu_user"] - before["cpu_user"]), 3),
        "cpu_system": round(max(0.0, after["cpu_system"] - before["cpu_system"]), 3),
        "source": SOURCE_TEJ,
    }


class ProcessScan(object):
    """The current use of every process group, from one scan of /proc, made when first asked."""

    def __init__(self):
        self.groups = None  # type: dict[int, list[int]] | None
        self.scanned = False

    def of_job(self, identity):
        """A running job's current use ({"rss", "cpu_user", "cpu_system", "source"}), or None.

        None without /proc (not Linux), or when the recorded process group is not
        this machine's (a job under Slurm on another node).
        """
        if not identity or not identity.get("pid") or not owns_group(identity):
            return None
        if not self.scanned:
            self.groups, self.scanned = scan_groups(), True
        found = (self.groups or {}).get(identity["pid"])
        if found is None:
            return None
        tick = float(os.sysconf("SC_CLK_TCK"))
        return {
            "rss": found[0] * os.sysconf("SC_PAGE_SIZE"),
            "cpu_user": round(found[1] / tick, 2),
            "cpu_system": round(found[2] / tick, 2),
            "source": SOURCE_PROC,
        }


def scan_groups():
    """{process group: [resident pages, user ticks, system ticks]} of every process; None
    without /proc. A process's ticks include those of the children it waited for."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    groups = {}  # type: dict[int, list[int]]
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as stream:
                fields = stream.read().rsplit(b")", 1)[1].split()
            group = int(fields[2])
            # proc(5) fields 14-17 (utime, stime, cutime, cstime) and 24 (rss).
            user, system = int(fields[11]) + int(fields[13]), int(fields[12]) + int(fields[14])
            pages = int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        total = groups.setdefault(group, [0, 0, 0])
        total[0] += pages
        total[1] += user
        total[2] += system
    return groups
