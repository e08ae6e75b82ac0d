"""The VHD as a page blob: sparse, parallel, resumable, verified.

Only the plan's ranges (:mod:`imagekit.publish.pages`) are sent, each as one Put Page with a transactional
MD5 (``validate_content``), several at once. The blob's metadata names the manifest's SHA-256, so an
interrupted upload is resumed (the blob's page ranges say what is done) and a blob with other content is
never written into. After the upload the blob is read back: its page ranges must cover every non-zero
page, and the content of its ranges must hash as the local file's does. Only then is it marked verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from imagekit.core.errors import BuildError, InputError
from imagekit.publish.pages import MAX_REQUEST, Plan, Range, covered, merge, split

log = logging.getLogger(__name__)

META_SHA = "imagekitsha256"
META_VERSION = "imagekitversion"
META_IMAGE = "imagekitimage"
META_VERIFIED = "imagekitverified"
DEFAULT_WORKERS = 8

CREDENTIAL_HINT = ("set AZURE_STORAGE_CONNECTION_STRING (e.g. for Azurite), or sign in the usual Azure way for "
                   "DefaultAzureCredential: AZURE_CLIENT_ID/AZURE_TENANT_ID with AZURE_CLIENT_SECRET or "
                   "AZURE_FEDERATED_TOKEN_FILE (workload identity, e.g. GitHub Actions OIDC), a managed identity, "
                   "or `az login`")


class PublishError(BuildError):
    """Azure (or the blob) said no; the message says what and where."""


def azure_message(exc: BaseException) -> str:
    """An Azure SDK error as one line: its error code and the first line of the service's message."""
    code = getattr(exc, "error_code", None) or getattr(getattr(exc, "error", None), "code", None)
    msg = getattr(exc, "message", None) or str(exc)
    first = str(msg).strip().splitlines()[0] if str(msg).strip() else type(exc).__name__
    if code and first.startswith(f"({code}) "):  # the SDK puts the code first; it is shown at the end
        first = first[len(str(code)) + 3:]
    status = getattr(exc, "status_code", None)
    parts = [p for p in (f"HTTP {status}" if status else "", str(code) if code else "") if p]
    return f"{first} ({', '.join(parts)})" if parts else first


def quiet_sdk_logs() -> None:
    """The SDK's HTTP logging stays off: at DEBUG it would log request headers and URLs."""
    for name in ("azure", "azure.core.pipeline.policies.http_logging_policy", "msal"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # DefaultAzureCredential logs each credential it tried at WARNING; the error names the ways to sign in
    logging.getLogger("azure.identity").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Storage:
    """Where the blob goes. ``service`` is an ``azure.storage.blob.BlobServiceClient``."""

    service: Any
    account: str
    from_connection_string: bool


def connect(account: str, *, endpoint: str = "", credential: Any = None,
            client_kwargs: dict[str, Any] | None = None) -> Storage:
    """The storage client: from ``AZURE_STORAGE_CONNECTION_STRING`` when set (Azurite, sovereign clouds, Azure
    Stack), else ``endpoint`` (default ``https://ACCOUNT.blob.core.windows.net``) with ``credential`` (default
    DefaultAzureCredential). The connection string holds a key: it is never logged or shown."""
    from azure.storage.blob import BlobServiceClient

    quiet_sdk_logs()
    kw = dict(client_kwargs or {})
    conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    if conn:
        try:
            service = BlobServiceClient.from_connection_string(conn, **kw)
        except (ValueError, TypeError):
            raise InputError("AZURE_STORAGE_CONNECTION_STRING is malformed (not shown: it holds a key)",
                             hint="expected DefaultEndpointsProtocol=...;AccountName=...;AccountKey=...;"
                                  "BlobEndpoint=... as the portal or `az storage account show-connection-string` "
                                  "gives it") from None
        name = str(service.account_name or "")
        if account and name and account != name:
            raise InputError(f"--storage-account {account!r} differs from the account in "
                             f"AZURE_STORAGE_CONNECTION_STRING ({name!r})",
                             hint="leave --storage-account out, or unset the connection string")
        return Storage(service=service, account=name or account, from_connection_string=True)
    if not account:
        raise InputError("--storage-account is required (or AZURE_STORAGE_CONNECTION_STRING)")
    if credential is None:
        credential = default_credential()
    url = endpoint or f"https://{account}.blob.core.windows.net"
    check_token(credential, "https://storage.azure.com/.default", "the storage account")
    return Storage(service=BlobServiceClient(url, credential=credential, **kw), account=account,
                   from_connection_string=False)


def default_credential() -> Any:
    from azure.identity import DefaultAzureCredential

    quiet_sdk_logs()
    return DefaultAzureCredential()


def check_token(credential: Any, scope: str, what: str) -> None:
    """Ask for a token before any upload, so missing credentials are one clear error up front."""
    from azure.core.exceptions import ClientAuthenticationError

    try:
        credential.get_token(scope)
    except ClientAuthenticationError as exc:
        first = str(exc.message or exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"no Azure credentials for {what}: {first}", hint=CREDENTIAL_HINT) from None


@dataclass
class UploadResult:
    url: str
    size: int
    data_bytes: int  # what the plan sends in all
    sent_bytes: int  # what this run sent
    requests: int  # Put Page requests this run sent
    resumed_bytes: int  # already on the blob from an earlier run
    already_verified: bool


@contextlib.contextmanager
def _progress(total: int, desc: str) -> Iterator[Callable[[int], object]]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=not sys.stderr.isatty(), file=sys.stderr, dynamic_ncols=True)
    lock = threading.Lock()

    def update(n: int) -> None:
        with lock:
            bar.update(n)

    try:
        yield update
    finally:
        bar.close()


def _existing_ranges(blob: Any) -> list[tuple[int, int]]:
    return merge((int(r.start), int(r.end) + 1) for r in blob.list_page_ranges())


class _Runner:
    """Runs ``fn`` over items on a thread pool; the first failure (or Ctrl-C) stops the rest, waits for the
    requests in flight and re-raises."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def run(self, fn: Callable[[Range], object], items: list[Range]) -> None:
        stop = threading.Event()

        def guarded(r: Range) -> object:
            if stop.is_set():
                return None
            return fn(r)

        pool = ThreadPoolExecutor(max_workers=self.workers)
        futures: list[Future[object]] = []
        try:
            futures = [pool.submit(guarded, r) for r in items]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                exc = f.exception()
                if exc is not None:
                    raise exc
        finally:
            stop.set()
            for f in futures:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def upload(storage: Storage, container: str, blob_name: str, path: os.PathLike[str] | str, plan: Plan, *,
           sha256: str, image: str, toolkit_version: str, overwrite: bool = False,
           workers: int = DEFAULT_WORKERS, request_size: int = MAX_REQUEST) -> UploadResult:
    """Upload ``path`` as page blob ``container/blob_name`` (resuming a matching partial one) and verify it."""
    from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
    from azure.storage.blob import ContentSettings

    blob = storage.service.get_blob_client(container, blob_name)
    where = f"blob {container}/{blob_name} in storage account {storage.account}"
    meta = {META_SHA: sha256, META_VERSION: toolkit_version, META_IMAGE: image}
    try:
        try:
            props = blob.get_blob_properties()
        except ResourceNotFoundError:
            props = None
            with contextlib.suppress(ResourceExistsError):
                storage.service.get_container_client(container).create_container()
        if props is not None:
            why = _mismatch(props, plan.size, sha256)
            if why and not overwrite:
                raise InputError(f"{where} already exists with other content: {why}; refusing to write into it",
                                 hint="pass --overwrite to replace it, or choose another --blob-name")
            if why:
                log.info("replacing %s (--overwrite): %s", where, why)
                blob.delete_blob(delete_snapshots="include")
                props = None
            elif (props.metadata or {}).get(META_VERIFIED) == sha256:
                log.info("%s is already uploaded and verified; nothing to send", where)
                return UploadResult(url=blob.url, size=plan.size, data_bytes=plan.data_bytes, sent_bytes=0,
                                    requests=0, resumed_bytes=plan.data_bytes, already_verified=True)
        if props is None:
            blob.create_page_blob(plan.size, metadata=meta,
                                  content_settings=ContentSettings(content_type="application/octet-stream"))
            existing: list[tuple[int, int]] = []
        else:
            existing = _existing_ranges(blob)
        ranges = split(((r.start, r.end) for r in plan.ranges), request_size)
        todo = [r for r in ranges if not covered(r, existing)]
        resumed = plan.data_bytes - sum(r.length for r in todo)
        if resumed:
            log.info("resuming %s: %d of %d data bytes are already there", where, resumed, plan.data_bytes)
        log.info("uploading %d bytes in %d requests to %s (%d at once)", sum(r.length for r in todo), len(todo),
                 where, workers)
        sent = _send(blob, path, todo, workers)
        _verify(blob, path, plan, workers, where)
        blob.set_blob_metadata({**meta, META_VERIFIED: sha256})
    except AzureError as exc:
        raise PublishError(f"{where}: {azure_message(exc)}") from None
    return UploadResult(url=blob.url, size=plan.size, data_bytes=plan.data_bytes, sent_bytes=sent[0],
                        requests=sent[1], resumed_bytes=resumed, already_verified=False)


def _mismatch(props: Any, size: int, sha256: str) -> str:
    raw_type = getattr(props, "blob_type", "")
    blob_type = str(getattr(raw_type, "value", raw_type) or "")
    if "page" not in blob_type.lower():
        return f"it is a {blob_type or 'non-page'} blob, not a page blob"
    if int(props.size) != size:
        return f"it is {props.size} bytes, the VHD {size}"
    got = (props.metadata or {}).get(META_SHA)
    if got != sha256:
        return f"its metadata names SHA-256 {got or '(none)'}, the VHD's manifest {sha256}"
    return ""


def _send(blob: Any, path: os.PathLike[str] | str, todo: list[Range], workers: int) -> tuple[int, int]:
    """Put Page for each range, ``workers`` at once; (bytes, requests) sent."""
    fd = os.open(path, os.O_RDONLY)
    counted = [0, 0]
    lock = threading.Lock()
    try:
        with _progress(sum(r.length for r in todo), "upload") as advance:

            def put(r: Range) -> None:
                data = os.pread(fd, r.length, r.start)
                if len(data) != r.length:
                    raise BuildError(f"{path}: short read at {r.start} (the file changed during the upload)")
                blob.upload_page(data, offset=r.start, length=r.length, validate_content=True)
                with lock:
                    counted[0] += r.length
                    counted[1] += 1
                advance(r.length)

            try:
                _Runner(workers).run(put, todo)
            except BaseException as exc:
                total = sum(r.length for r in todo)
                log.warning("upload stopped after %d of %d bytes (%s); run publish again to resume",
                            counted[0], total, type(exc).__name__)
                raise
    finally:
        os.close(fd)
    return counted[0], counted[1]


def _verify(blob: Any, path: os.PathLike[str] | str, plan: Plan, workers: int, where: str) -> None:
    """The blob's page ranges cover every non-zero page, and its ranges' content hashes as the file's."""
    remote = _existing_ranges(blob)
    missing = [r for r in plan.ranges if not covered(r, remote)]
    if missing:
        raise PublishError(f"{where}: verification failed: {len(missing)} data ranges are not on the blob "
                           f"(first at byte {missing[0].start})")
    chunks = split(remote, MAX_REQUEST)
    local: dict[int, bytes] = {}
    theirs: dict[int, bytes] = {}
    fd = os.open(path, os.O_RDONLY)
    lock = threading.Lock()
    try:
        with _progress(sum(c.length for c in chunks), "verify") as advance:

            def check(c: Range) -> None:
                got = blob.download_blob(offset=c.start, length=c.length).readall()
                want = os.pread(fd, c.length, c.start)
                with lock:
                    theirs[c.start] = hashlib.sha256(got).digest()
                    local[c.start] = hashlib.sha256(want).digest()
                advance(c.length)

            _Runner(workers).run(check, chunks)
    finally:
        os.close(fd)
    digest_remote = hashlib.sha256(b"".join(theirs[c.start] for c in chunks)).hexdigest()
    digest_local = hashlib.sha256(b"".join(local[c.start] for c in chunks)).hexdigest()
    if digest_remote != digest_local:
        bad = next(c for c in chunks if theirs[c.start] != local[c.start])
        raise PublishError(f"{where}: verification failed: the blob's content differs from the VHD at bytes "
                           f"{bad.start}-{bad.end}")
    log.info("verified %s: %d page ranges, %d bytes, content digest %s", where, len(remote),
             sum(e - s for s, e in remote), digest_local[:16])
