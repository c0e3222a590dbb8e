"""Uploads and submit: a job's tree laid out from the store, then started by the queue's runner."""

import errno
import itertools
import json
import os
import re
import struct

from ...protocol import (
    ERR_BAD_REQUEST,
    ERR_INVALID,
    ERR_JOB_EXISTS,
    ERR_RUNNER_MISSING,
    ID_CHARACTERS,
    MAX_ID_LENGTH,
    STATE_STARTING,
    new_job_id_problem,
)
from ..errors import AgentError, checked_rows
from ..files import (
    make_private_dir,
    make_private_dirs,
    now_iso,
    randrange,
    remove_quietly,
    remove_stale,
    remove_tree,
    write_json_new,
)
from ..index import Intent, crash_point, forget, sync
from ..jobs import check_script, start_time_of, validate_job, validate_secrets
from ..launch import warm_fork_server, while_forking
from ..layout import (
    JOB_FILE,
    JOBS_DIR,
    LAYOUT_PENDING,
    LEASES_DIR,
    MANIFEST_FILE,
    STAGING_DIR,
    STALE_TRASH,
    STALE_UPLOAD,
    STATUS_FILE,
    STORE_DIR,
    TRASH_DIR,
    WORK_DIR,
    validate_job_id,
)
from ..manifest import keep_part, parse_part
from ..processes import login_user
from ..queue import open_queue
from ..runners import check_runner_fields
from ..store import (
    MODE_SUFFIXES,
    STORE_MTIME,
    collect_garbage,
    lease_path,
    note_lease,
    store_mode,
)
from ..upload import Upload, lay_out_kept, new_token


def upload_begin(connection, queue, manifest, contents=None, submit=None, token=None, more=False):
    """Open a staging area for a new job and lay out its tree from the manifest.

    Every file whose content the store holds is linked in at once; the reply
    lists the others, {"token": T, "missing": JSON [[index, offset], ...]}: the
    client sends those (one file per content) with upload_data, from offset.
    contents, [[index, data], ...], are whole contents of files sent along in
    case the store lacks them (those it has are ignored). submit, the
    arguments of submit but the token: if nothing is missing, the upload is
    submitted at once, and the reply's "job_id" names the job (None if the
    queue's plugin runner must be installed first: then submit the token).

    token: the upload's, chosen by the client (a new one: 16 to 32 hex
    digits), so that it can send what follows without waiting for the reply.
    more: the manifest goes on in upload_manifest requests; this reply is
    {"token": T}, and the last part's is the one described here.
    """
    rows, contents = parse_part(manifest, contents, submit, more)
    text, queue = queue, open_queue(queue, create=True, with_runner=False)
    warm_fork_server(queue)  # an upload is a submit on its way
    upload = open_upload(connection, queue, token)
    keep_part(os.path.join(upload.staging, MANIFEST_FILE), manifest)
    return take_manifest(connection, text, upload, rows, contents, submit, more)


def open_upload(connection, queue, token):
    """A new upload of this connection: its staging area (token: the client's, or None)."""
    if token is None:
        token = new_token()
    elif not isinstance(token, str) or not re.match(r"[0-9a-f]{16,32}\Z", token):
        raise AgentError(ERR_BAD_REQUEST, "Invalid upload token %r" % (token,))
    remove_stale(queue.path(STAGING_DIR), STALE_UPLOAD)
    remove_stale(queue.path(TRASH_DIR), STALE_TRASH)
    staging = queue.path(STAGING_DIR, token)
    try:
        make_private_dir(staging)
    except FileExistsError:
        raise AgentError(ERR_INVALID, "An upload with token %r exists already" % token)
    upload = Upload(queue, token, staging)
    try:
        make_private_dir(os.path.join(staging, WORK_DIR))
        make_private_dirs(queue.path(STORE_DIR, LEASES_DIR))
        collect_garbage(queue)
    except BaseException:
        remove_tree(staging)
        raise
    connection.uploads[token] = upload
    return upload


def upload_manifest(connection, queue, token, manifest, contents=None, submit=None, more=False):
    """Lay out the next part of an upload's manifest: see upload_begin's more.

    Its entries follow the previous parts' (their indices too).
    """
    upload = upload_of(connection, queue, token)
    if upload.planned:
        raise AgentError(ERR_INVALID, "The manifest of upload %r is complete" % token)
    try:
        rows, contents = parse_part(manifest, contents, submit, more)
        keep_part(os.path.join(upload.staging, MANIFEST_FILE), manifest)
    except BaseException:
        upload_abort(connection, queue, token)
        raise
    return take_manifest(connection, queue, upload, rows, contents, submit, more)


def take_manifest(connection, queue, upload, rows, contents, submit, more):
    """Lay out a part of an upload's manifest; after its last part, plan the upload.

    Anything wrong throws the upload away.
    """
    import gc

    collecting = gc.isenabled()
    gc.disable()  # the rows are many small objects: the collector would walk them for nothing
    try:
        upload.add(rows)
        if more:
            return {"token": upload.token}
        missing = upload.plan()
        if contents and missing:
            missing = upload.receive_whole(contents, missing)
    except BaseException:
        connection.uploads.pop(upload.token, None)
        upload.discard()
        remove_tree(upload.staging)
        raise
    finally:
        if collecting:
            gc.enable()
    reply = {"token": upload.token, "missing": json.dumps(missing).encode("ascii")}
    if submit is not None and not missing:
        reply["job_id"] = submit_at_once(connection, queue, upload.token, submit)
    return reply


def submit_at_once(connection, queue, token, submit_args):
    """Submit a complete upload; None if the queue's plugin runner must be installed first."""
    try:
        return submit(connection, queue, token, **submit_args)
    except AgentError as exc:
        if exc.kind == ERR_RUNNER_MISSING:
            return None  # the upload waits: the client installs the runner, then submits
        abort_quietly(connection, queue, token)
        raise
    except BaseException:
        abort_quietly(connection, queue, token)
        raise


def abort_quietly(connection, queue, token):
    """Throw away an upload a failed submit may have left (a submit leaves nothing)."""
    try:
        upload_abort(connection, queue, token)
    except (AgentError, OSError):
        pass


def staging_dir(queue, token):
    """The staging area of an upload in progress."""
    if not isinstance(token, str) or not re.match(r"[0-9a-f]+\Z", token):
        raise AgentError(ERR_INVALID, "Invalid upload token %r" % (token,))
    path = queue.path(STAGING_DIR, token)
    if not queue.exists or not os.path.isdir(path):
        raise AgentError(ERR_INVALID, "No upload in progress with token %r" % token)
    return path


def upload_of(connection, queue, token):
    """The upload in progress on this connection with that token."""
    staging = staging_dir(open_queue(queue, with_runner=False), token)
    upload = connection.uploads.get(token)
    if upload is None or upload.staging != staging:
        raise AgentError(ERR_INVALID, "No upload in progress with token %r" % token)
    return upload


def upload_data(connection, queue, token, chunks):
    """Write chunks [index, offset, data] of the files upload_begin asked for."""
    upload = upload_of(connection, queue, token)
    for index, offset, data in checked_rows(chunks, (int, int, bytes)):
        upload.receive(index, offset, data)


def upload_abort(connection, queue, token):
    """Throw away an upload in progress (what reached the store stays there)."""
    staging = staging_dir(open_queue(queue, with_runner=False), token)
    upload = connection.uploads.pop(token, None)
    if upload is not None:
        upload.discard()
    remove_tree(staging)


def drop_upload(connection, queue, token):
    """Forget an upload after a failed submit: the files it holds open, its lease."""
    upload = connection.uploads.pop(token, None)
    if upload is not None:
        upload.discard_files()
    remove_quietly(lease_path(queue, token))


def finish_upload(connection, token):
    """Complete the tree of a planned upload: every file arrived, symlinks, folder modes."""
    upload = connection.uploads.pop(token, None)
    if upload is None:
        raise AgentError(ERR_INVALID, "No upload in progress with token %r" % token)
    upload.finish()


def submit(
    connection, queue, token, job_id=None, id_name=None, job=None, secrets=None, params=None
):
    """Turn a completed upload into a job and hand it to the queue's runner.

    Without job_id, the job's id is NAME_USER_RANDOM: id_name (the job
    directory's name) and the user this agent runs as, the one tej logged in as.

    secrets are environment variables for the job that are never written
    to disk: they reach the supervisor through a pipe (job.json keeps
    their names only).

    A job with "array" is an array (see server/arrays.py); params, its rows as
    JSON lines text (row N for task N), if it has some.
    """
    id_prefix = None if job_id is not None else default_id_prefix(id_name)
    return submit_upload(connection, queue, token, job_id, id_prefix, job, secrets, params)


def submit_upload(connection, queue, token, job_id, id_prefix, job, secrets, params=None):
    """Submit a completed upload as job_id, or as ID_PREFIX_RANDOM (see submit)."""
    secrets = validate_secrets(secrets or {})
    queue = open_queue(queue, create=True)
    staging = staging_dir(queue, token)
    try:
        job, params = checked_job(queue, job_id, job, secrets, params)
        finish_upload(connection, token)
        if not os.path.exists(os.path.join(staging, LAYOUT_PENDING)):  # else checked (deferred)
            check_script(os.path.join(staging, WORK_DIR), job["script"])
        if job.get("array") is not None:
            from ..arrays import make_array_folder

            make_array_folder(staging, params)
        job_id, job_dir, intent = reserve_id(queue, staging, job_id, id_prefix, job)
    except BaseException:
        drop_upload(connection, queue, token)
        remove_tree(staging)  # a failed submit leaves nothing, not even the upload
        raise
    indexed = []

    def index_job():  # while the supervisor is forked; on an error the intent stays (repair)
        try:
            sync(queue.root, job_id, with_row=False)
            indexed.append(job_id)
        except OSError:
            pass

    try:
        crash_point("job-renamed")
        with while_forking(index_job):
            queue.runner.submit(job_id, job_dir, job, secrets)
    except BaseException:
        remove_tree(job_dir)
        forget(queue.root, job_id)
        intent.end()
        raise
    if indexed:
        intent.end()
    return job_id


def checked_job(queue, job_id, job, secrets, params):
    """A submitted job's metadata, checked (with its runner), and its params' rows."""
    if job_id is not None:
        problem = new_job_id_problem(job_id)
        if problem is not None:
            raise AgentError(ERR_INVALID, problem)
    job = dict(validate_job(job or {}), secret_env=sorted(secrets))
    check_runner_fields(queue.runner, job, secrets)
    if job.get("array") is None:
        if params is not None:
            raise AgentError(ERR_INVALID, "params are for an array")
        return job, None
    if not getattr(queue.runner, "supports_arrays", False):
        raise AgentError(
            ERR_INVALID, "The %s runner can't run arrays" % getattr(queue.runner, "name", "?")
        )
    from ..arrays import check_array

    return check_array(job, params)


def reserve_id(queue, staging, job_id, id_prefix, job):
    """Atomically move the staged job to jobs/ID; returns (id, job_dir, intent).

    The intent (index.Intent) is begun before the move: if this process dies
    before the job is in the index and with its runner, the next command
    repairs it. The caller ends it.
    """
    made = ("%s_%06d" % (id_prefix, randrange(10**6)) for _ in range(50))
    first = job_id if job_id is not None else next(made)  # made one by one: the first is free
    candidates = itertools.chain([first], made if job_id is None else [])
    validate_job_id(first)
    start_time = start_time_of(job)
    for candidate in candidates:
        record = first_record(queue, dict(job, id=candidate), start_time)
        # Not durable: after a power cut, a job that was starting is lost anyway (see
        # docs/queue-format.md, How files are written). Written in place: nobody reads
        # the staging folder before its rename.
        written = [os.path.join(staging, name) for name in (JOB_FILE, STATUS_FILE)]
        if is_plain_start(queue, job, record):  # its supervisor writes its first record
            written.pop()
        write_json_new(written[0], dict(job, id=candidate))
        if written[1:]:
            write_json_new(written[1], record)
        note_lease(queue, staging, candidate)
        job_dir = queue.path(JOBS_DIR, candidate)
        intent = Intent(queue.root, candidate).begin()
        try:
            os.rename(staging, job_dir)
            return candidate, job_dir, intent
        except OSError as exc:
            intent.end()
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            for path in written:  # the next candidate's are written anew
                os.unlink(path)
    if job_id is not None:
        raise AgentError(ERR_JOB_EXISTS, "A job %r already exists" % job_id)
    raise AgentError(ERR_JOB_EXISTS, "Could not find a free identifier for %r" % id_prefix)


def is_plain_start(queue, job, record):
    """Whether a new job's first record says no more than `starting` since its submit (a
    job, not an array, the default runner starts at once): then it has no STATUS_FILE
    until its supervisor writes one, and its job.json's time stands for that record
    (records.first_record_of). One file fewer to create, and to free when it is replaced.
    """
    plain = {"id": record.get("id"), "state": STATE_STARTING, "submitted_at": None}
    return (
        job.get("array") is None
        and queue.runner.initial_state == STATE_STARTING
        and sorted(record) == sorted(plain)
        and record.get("state") == STATE_STARTING
    )


def default_id_prefix(name):
    """The start of a default job id, NAME_USER (a random part follows), in id characters."""
    if not isinstance(name, str):
        raise AgentError(ERR_INVALID, "Give a job identifier or the name to make one from")
    outside = "[^%s]" % ID_CHARACTERS
    name, user = [re.sub(outside, "_", part) or "job" for part in (name, login_user())]
    return "%s_%s" % (name[:80], user[:32])


def store_has(connection, queue, digests, modes):
    """Which contents the queue's store holds, for `tej submit --dry-run`: read only.

    digests: the 32-byte sha256 of each content, end to end; modes: the mode of
    a file of each (little-endian uint16). The reply is a text of one "1" (held)
    or "0" per content. A queue that doesn't exist holds nothing (and isn't made).
    """
    if not isinstance(digests, bytes) or not isinstance(modes, bytes):
        raise AgentError(ERR_BAD_REQUEST, "digests and modes must be bytes")
    count = len(digests) // 32
    if len(digests) % 32 or len(modes) != 2 * count:
        raise AgentError(ERR_BAD_REQUEST, "digests and modes must list as many contents")
    found = open_queue(queue, with_runner=False)
    if not found.exists:
        return "0" * count
    held = []
    for index, mode in enumerate(struct.unpack("<%dH" % count, modes)):
        digest = digests[32 * index : 32 * index + 32].hex()
        blob = found.path(STORE_DIR, digest[:2], digest + MODE_SUFFIXES[store_mode(mode)])
        try:
            info = os.lstat(blob)
            held.append("1" if info.st_mtime == STORE_MTIME else "0")
        except OSError:
            held.append("0")
    return "".join(held)


def first_record(queue, job, start_time):
    """A new job's status record, as its runner wants it (complete before anyone sees it)."""
    record = {"id": job["id"], "state": queue.runner.initial_state, "submitted_at": now_iso()}
    if start_time is not None:
        record["start_time"] = start_time
    prepare = getattr(queue.runner, "prepare", None)
    return prepare(job, record) if prepare is not None else record


def resubmit(connection, queue, job_id, new_id=None, job=None, secrets=None):
    """Start a new job from the files an existing one was uploaded with: nothing is sent.

    Its tree is laid out from the store, by the old job's MANIFEST_FILE (as an
    upload's is); the old job is left as it is. job and secrets are submit's;
    new_id is the new job's id, by default the old one's with a new random part.
    A content the store no longer holds (a job wrote to its input file, or it
    was collected) is an error: nothing is created.
    """
    text, queue = queue, open_queue(queue, with_runner=False)
    warm_fork_server(queue)  # a resubmit is a submit on its way
    old_dir = queue.job_dir(job_id)
    manifest = os.path.join(old_dir, MANIFEST_FILE)
    if not os.path.isfile(manifest):
        raise AgentError(
            ERR_INVALID,
            "Job %r has no record of the files it was uploaded with (submitted by an older "
            "tej?): submit its directory again" % job_id,
        )
    upload = open_upload(connection, queue, None)
    try:
        lay_out_resubmitted(upload, old_dir, job)
    except BaseException:
        connection.uploads.pop(upload.token, None)
        upload.discard()
        remove_tree(upload.staging)
        raise
    id_prefix = None if new_id is not None else re.sub(r"_\d{6}\Z", "", job_id)[: MAX_ID_LENGTH - 7]
    params = None
    if isinstance(job, dict) and job.get("array") is not None:
        params = kept_params(old_dir)  # an array's tasks keep their rows (resubmit --failed)
    return submit_upload(connection, text, upload.token, new_id, id_prefix, job, secrets, params)


def lay_out_resubmitted(upload, old_dir, job):
    """Lay a resubmitted job out: an array's from an old array's template (hard links, one
    pass), else (or if the template is not as uploaded) from the store; a job the default
    runner starts at once, by its supervisor (server/deferred.py)."""
    from ..deferred import defer_layout

    if defer_layout(upload, old_dir, job):
        return
    manifest = os.path.join(old_dir, MANIFEST_FILE)
    keep_to = os.path.join(upload.staging, MANIFEST_FILE)
    if isinstance(job, dict) and job.get("array") is not None:
        from ..arrays import is_array
        from ..template import copy_small_file, link_template

        if is_array(old_dir):
            if link_template(upload, old_dir):
                copy_small_file(manifest, keep_to)
                return
            remove_tree(upload.work)
            make_private_dir(upload.work)
    lay_out_kept(upload, manifest, keep_to)


def kept_params(array_dir):
    """An array's params rows, as submitted (JSON lines text), or None if it has none."""
    from ..layout import PARAMS_FILE

    try:
        with open(os.path.join(array_dir, PARAMS_FILE), encoding="utf-8") as stream:
            return stream.read()
    except FileNotFoundError:
        return None


HANDLERS = {
    "upload_begin": upload_begin,
    "upload_manifest": upload_manifest,
    "upload_data": upload_data,
    "upload_abort": upload_abort,
    "submit": submit,
    "store_has": store_has,
    "resubmit": resubmit,
}
