"""Publishing a registered, verified version to Azure: the fixed VHD as a page blob, then an Azure Compute
Gallery image version made from it, and a record of where it went in the local gallery.

What others use: :class:`PublishOptions`, :func:`prepare` (every check, before anything is sent; with
``connect`` it also makes the clients),
:func:`dry_run`, :func:`publish`, and :class:`StaticTokenCredential`.

Modules: ``validate`` (Azure's naming rules, the image's own state), ``pages`` (the ranges a sparse VHD
needs), ``blob`` (the parallel, resumable, verified page-blob upload), ``arm`` (the gallery requests).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import imagekit
from imagekit.core.errors import InputError
from imagekit.core.versions import Version
from imagekit.gallery import Gallery, ImageVersion
from imagekit.publish import arm, blob, pages, validate
from imagekit.publish.arm import ARM_ENDPOINT, GalleryResult, GalleryTarget, StaticTokenCredential
from imagekit.publish.blob import PublishError, UploadResult

__all__ = ["ARM_ENDPOINT", "Clients", "Prepared", "PublishError", "PublishOptions", "PublishResult",
           "StaticTokenCredential", "connect_clients", "dry_run", "prepare", "publish"]

log = logging.getLogger(__name__)


@dataclass
class PublishOptions:
    distro: str
    version: str
    storage_account: str = ""  # may come from AZURE_STORAGE_CONNECTION_STRING
    container: str = ""
    blob_name: str = ""  # default <distro>-<version>.vhd
    blob_endpoint: str = ""  # default https://<account>.blob.core.windows.net
    storage_resource_group: str = ""  # the storage account's; default: resource_group
    gallery: str = ""
    resource_group: str = ""
    image_definition: str = ""
    subscription: str = ""  # default $AZURE_SUBSCRIPTION_ID
    location: str = ""  # default: the gallery's
    target_regions: list[str] = field(default_factory=list)  # REGION or REGION=REPLICAS
    replica_count: int = 1
    end_of_life: str = ""
    exclude_from_latest: bool = False
    publisher: str = "imagekit"
    offer: str = ""  # default: the distro's family
    sku: str = ""  # default: the image definition's name
    blob_only: bool = False
    overwrite: bool = False
    workers: int = blob.DEFAULT_WORKERS
    request_size: int = pages.MAX_REQUEST
    arm_endpoint: str = ARM_ENDPOINT
    polling_interval: float = 15.0


@dataclass
class Clients:
    """Connected, credentials checked, the gallery found (before the VHD is hashed or anything is sent)."""

    storage: blob.Storage
    compute: Any  # azure.mgmt.compute.ComputeManagementClient, or None with --blob-only
    location: str  # the gallery's region


@dataclass
class Prepared:
    """Options checked and resolved, the source verified against its manifest, the upload planned."""

    opts: PublishOptions
    source: validate.Source
    blob_name: str
    plan: pages.Plan
    target: GalleryTarget | None
    storage_group: str
    clients: Clients | None = None


@dataclass
class PublishResult:
    upload: UploadResult
    gallery: GalleryResult | None
    image: ImageVersion
    record: dict[str, Any]


def _subscription(opts: PublishOptions) -> str:
    sub = opts.subscription or os.environ.get("AZURE_SUBSCRIPTION_ID", "")
    if not sub:
        raise InputError("--subscription is required for the gallery step (or AZURE_SUBSCRIPTION_ID)",
                         hint="az account show --query id; or --blob-only to stop after the upload")
    return validate.check_subscription(sub)


def prepare(opts: PublishOptions, gallery: Gallery | None = None, today: dt.date | None = None, *,
            connect: bool = False, **connect_kwargs: Any) -> Prepared:
    """Every check, cheapest first; raises before anything is sent. With ``connect`` the clients are made (and
    the credentials and the gallery checked) before the VHD's SHA-256 pass, so those errors come in seconds;
    ``connect_kwargs`` go to :func:`connect_clients`."""
    version = validate.check_version(opts.version)
    if opts.storage_account or not os.environ.get("AZURE_STORAGE_CONNECTION_STRING"):
        if not opts.storage_account:
            raise InputError("--storage-account is required (or AZURE_STORAGE_CONNECTION_STRING)")
        validate.check_storage_account(opts.storage_account)
    if not opts.container:
        raise InputError("--container is required")
    validate.check_container(opts.container)
    blob_name = validate.check_blob_name(opts.blob_name or f"{opts.distro}-{version}.vhd")
    if not 1 <= opts.workers <= 64:
        raise InputError(f"--workers: bad count {opts.workers}; allowed: 1 to 64")
    eol = validate.check_end_of_life(opts.end_of_life, today) if opts.end_of_life else None
    validate.check_replicas(opts.replica_count)
    regions = tuple(validate.parse_target_region(r, opts.replica_count) for r in opts.target_regions)
    target = None
    storage_group = opts.storage_resource_group or opts.resource_group
    if not opts.blob_only:
        missing = [o for o, v in (("--gallery", opts.gallery), ("--resource-group", opts.resource_group),
                                  ("--image-definition", opts.image_definition)) if not v]
        if missing:
            raise InputError(f"{', '.join(missing)} required for the gallery step",
                             hint="or --blob-only to stop after the verified upload")
        validate.check_gallery(opts.gallery)
        validate.check_resource_group(opts.resource_group)
        validate.check_definition(opts.image_definition)
        if opts.storage_resource_group:
            validate.check_resource_group(opts.storage_resource_group, "--storage-resource-group")
        if opts.location:
            validate.check_region(opts.location)
        sub = _subscription(opts)
    g = gallery or Gallery()
    source = validate.check_source(g, opts.distro, version, files=False)
    if not opts.blob_only:
        offer = validate.check_identifier("offer", opts.offer or str(source.manifest.get("family") or opts.distro))
        # the (publisher, offer, sku) triple is unique in a gallery: the definition's own name keeps it so
        sku = validate.check_identifier("sku", opts.sku or opts.image_definition)
        publisher = validate.check_identifier("publisher", opts.publisher)
        target = GalleryTarget(
            subscription=sub, resource_group=opts.resource_group, gallery=opts.gallery,
            definition=opts.image_definition, version=str(version), location=opts.location, regions=regions,
            replica_count=opts.replica_count, end_of_life=eol, exclude_from_latest=opts.exclude_from_latest,
            publisher=publisher, offer=offer, sku=sku,
            description=f"{source.manifest.get('distro_name') or opts.distro}, built and verified by imagekit")
    clients = connect_clients(opts, target, **connect_kwargs) if connect else None
    validate.check_files(source)
    plan = pages.plan(source.vhd, opts.request_size)
    return Prepared(opts=opts, source=source, blob_name=blob_name, plan=plan, target=target,
                    storage_group=storage_group, clients=clients)


def connect_clients(opts: PublishOptions, target: GalleryTarget | None, *, storage_credential: Any = None,
                    arm_credential: Any = None, blob_client_kwargs: dict[str, Any] | None = None,
                    arm_client_kwargs: dict[str, Any] | None = None) -> Clients:
    """The storage client and (unless --blob-only) the resource manager's, each credential checked, and the
    gallery read."""
    storage = blob.connect(opts.storage_account, endpoint=opts.blob_endpoint, credential=storage_credential,
                           client_kwargs=blob_client_kwargs)
    compute = None
    location = ""
    if target is not None:
        cred = arm_credential if arm_credential is not None else _arm_credential(storage_credential)
        compute = arm.client(cred, target.subscription, opts.arm_endpoint, polling_interval=opts.polling_interval,
                             client_kwargs=arm_client_kwargs)
        location = arm.gallery_location(compute, target)
    return Clients(storage=storage, compute=compute, location=location)


def _blob_url(p: Prepared) -> str:
    """The blob's URL as a dry run shows it (the real run takes it from the client)."""
    conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    if conn:
        from azure.storage.blob import BlobClient

        return str(BlobClient.from_connection_string(conn, p.opts.container, p.blob_name).url)
    base = (p.opts.blob_endpoint or f"https://{p.opts.storage_account}.blob.core.windows.net").rstrip("/")
    return f"{base}/{p.opts.container}/{p.blob_name}"


def _account(p: Prepared) -> str:
    conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    if conn and not p.opts.storage_account:
        from azure.storage.blob import BlobServiceClient

        return str(BlobServiceClient.from_connection_string(conn).account_name)
    return p.opts.storage_account


def dry_run(p: Prepared) -> list[str]:
    """What a run would send, as lines to print; touches nothing."""
    plan = p.plan
    url = _blob_url(p)
    mib = 1024 * 1024
    lines = [
        f"would upload {p.source.vhd} ({p.opts.distro} {p.source.image.version}, sha256 {p.source.sha256})",
        f"  to page blob {url}",
        f"  file size {plan.size} bytes ({plan.size / mib:.1f} MiB); data extents {plan.extent_bytes} bytes; "
        f"non-zero pages to send {plan.data_bytes} bytes ({plan.data_bytes / mib:.1f} MiB, "
        f"{100 * plan.data_bytes / plan.size:.2f}% of the file) in {len(plan.ranges)} Put Page requests of at most "
        f"{p.opts.request_size // 1024} KiB, {p.opts.workers} at once",
        "  (a resumed upload sends only what the blob's page ranges lack; then the blob is read back and verified)",
    ]
    if p.target is None:
        lines.append("--blob-only: no gallery requests")
        return lines
    account_id = arm.storage_account_id(p.target.subscription, p.storage_group, _account(p))
    lines.append("gallery requests (the image definition's PUT only when it is missing"
                 + ("" if p.target.location else "; the gallery's region is read from it, or give --location;"
                    " it is added to the target regions when they lack it") + "):")
    for r in arm.planned_requests(p.target, url, account_id, p.opts.arm_endpoint):
        lines.extend("  " + line for line in r.show().splitlines())
    return lines


def publish(p: Prepared, *, gallery: Gallery | None = None, storage_credential: Any = None,
            arm_credential: Any = None, blob_client_kwargs: dict[str, Any] | None = None,
            arm_client_kwargs: dict[str, Any] | None = None) -> PublishResult:
    """Upload (or resume, or find done) the page blob, verify it, make the gallery version, record it."""
    opts = p.opts
    g = gallery or Gallery()
    clients = p.clients or connect_clients(  # credentials and the gallery are checked before the upload starts
        opts, p.target, storage_credential=storage_credential, arm_credential=arm_credential,
        blob_client_kwargs=blob_client_kwargs, arm_client_kwargs=arm_client_kwargs)
    storage, compute, location = clients.storage, clients.compute, clients.location
    image = f"{opts.distro}/{p.source.image.version}"
    up = blob.upload(storage, opts.container, p.blob_name, p.source.vhd, p.plan, sha256=p.source.sha256,
                     image=image, toolkit_version=imagekit.__version__, overwrite=opts.overwrite,
                     workers=opts.workers, request_size=opts.request_size)
    gal = None
    if p.target is not None and compute is not None:
        account_id = arm.storage_account_id(p.target.subscription, p.storage_group, storage.account)
        gal = arm.publish_version(compute, p.target, location, up.url, account_id)
    record = {
        "key": f"{up.url}|{gal.version_id if gal else ''}",
        "blob_url": up.url, "storage_account": storage.account, "container": opts.container, "blob": p.blob_name,
        "sha256": p.source.sha256, "gallery_version_id": gal.version_id if gal else None,
        "regions": gal.regions if gal else [], "state": gal.state if gal else "blob-verified",
        "published_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }
    iv = g.record_publication(opts.distro, p.source.image.version, record)
    return PublishResult(upload=up, gallery=gal, image=iv, record=record)


def _arm_credential(storage_credential: Any) -> Any:
    token = os.environ.get("IMAGEKIT_ARM_ACCESS_TOKEN", "")
    if token:
        return StaticTokenCredential(token)
    return storage_credential if storage_credential is not None else blob.default_credential()


def parse_version(text: str) -> Version:
    return validate.check_version(text)


