"""The Azure Compute Gallery step, through azure-mgmt-compute: the image definition (created when missing),
then the image version from the uploaded blob, each a long-running operation waited for.

The request bodies are built here as the REST API's JSON and handed to the SDK as they are, so ``--dry-run``
prints exactly what would be sent. The resource manager's base URL and the credential are parameters: the
tests point the SDK at a local stand-in (tests/arm_standin.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from imagekit.core.errors import InputError
from imagekit.publish.blob import CREDENTIAL_HINT, PublishError, azure_message, check_token, quiet_sdk_logs

log = logging.getLogger(__name__)

ARM_ENDPOINT = "https://management.azure.com"
# The REST API version of Microsoft.Compute/galleries the SDK speaks; passed explicitly so a dry run's URLs are
# the ones sent.
API_VERSION = "2026-03-03"
# imagekit's images boot with BIOS from an MBR disk: generation 1 on Hyper-V (Trusted Launch needs V2).
HYPERV_GENERATION = "V1"
POLL_LOG_SECONDS = 30.0
UNKNOWN_LOCATION = "<the gallery's location>"  # what a dry run without --location shows


class StaticTokenCredential:
    """A bearer token the caller already has (``az account get-access-token``, a CI step): no sign-in here."""

    def __init__(self, token: str, expires_on: int | None = None) -> None:
        self._token = token
        self._expires = expires_on or int(time.time()) + 3600

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(self._token, self._expires)

    def __repr__(self) -> str:  # never the token
        return "StaticTokenCredential(<hidden>)"


@dataclass(frozen=True)
class GalleryTarget:
    subscription: str
    resource_group: str
    gallery: str
    definition: str
    version: str
    location: str  # "" = the gallery's own
    regions: tuple[tuple[str, int], ...] = ()  # (region, replicas); empty = the gallery's location
    replica_count: int = 1
    end_of_life: dt.date | None = None
    exclude_from_latest: bool = False
    publisher: str = "imagekit"
    offer: str = ""
    sku: str = ""
    description: str = ""
    storage_account_type: str = "Standard_LRS"


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    body: dict[str, Any] | None = None

    def show(self) -> str:
        text = f"{self.method} {self.url}"
        if self.body is not None:
            text += "\n" + json.dumps(self.body, indent=2)
        return text


@dataclass
class GalleryResult:
    version_id: str
    state: str
    regions: list[str] = field(default_factory=list)
    definition_created: bool = False
    version_created: bool = False


def storage_account_id(subscription: str, group: str, account: str) -> str:
    return (f"/subscriptions/{subscription}/resourceGroups/{group}/providers/Microsoft.Storage/"
            f"storageAccounts/{account}")


def _path(t: GalleryTarget, *, image: bool = False, version: bool = False) -> str:
    p = (f"/subscriptions/{quote(t.subscription)}/resourceGroups/{quote(t.resource_group)}/providers/"
         f"Microsoft.Compute/galleries/{quote(t.gallery)}")
    if image or version:
        p += f"/images/{quote(t.definition)}"
    if version:
        p += f"/versions/{quote(t.version)}"
    return p


def definition_body(t: GalleryTarget, location: str) -> dict[str, Any]:
    props: dict[str, Any] = {
        "osType": "Linux", "osState": "Generalized", "hyperVGeneration": HYPERV_GENERATION,
        "architecture": "x64",
        "identifier": {"publisher": t.publisher, "offer": t.offer, "sku": t.sku},
    }
    if t.description:
        props["description"] = t.description
    return {"location": location, "properties": props}


def version_body(t: GalleryTarget, location: str, blob_url: str, account_id: str) -> dict[str, Any]:
    regions = list(t.regions) or [(location, t.replica_count)]
    if location != UNKNOWN_LOCATION and location not in [r for r, _ in regions]:
        regions.insert(0, (location, t.replica_count))  # Azure keeps a replica in the gallery's own region
    publishing: dict[str, Any] = {
        "targetRegions": [{"name": r, "regionalReplicaCount": n, "storageAccountType": t.storage_account_type}
                          for r, n in regions],
        "replicaCount": t.replica_count,
        "excludeFromLatest": t.exclude_from_latest,
        "storageAccountType": t.storage_account_type,
    }
    if t.end_of_life is not None:
        publishing["endOfLifeDate"] = f"{t.end_of_life.isoformat()}T00:00:00Z"
    return {"location": location, "properties": {
        "publishingProfile": publishing,
        "storageProfile": {"osDiskImage": {"hostCaching": "ReadOnly",
                                           "source": {"uri": blob_url, "storageAccountId": account_id}}},
    }}


def planned_requests(t: GalleryTarget, blob_url: str, account_id: str, endpoint: str = ARM_ENDPOINT) -> list[Request]:
    """What :func:`publish_version` sends when nothing exists yet (the definition is only PUT when missing)."""
    base = endpoint.rstrip("/")
    q = f"?api-version={API_VERSION}"
    location = t.location or UNKNOWN_LOCATION
    return [
        Request("GET", base + _path(t) + q),
        Request("GET", base + _path(t, image=True) + q),
        Request("PUT", base + _path(t, image=True) + q, definition_body(t, location)),
        Request("GET", base + _path(t, version=True) + q),
        Request("PUT", base + _path(t, version=True) + q, version_body(t, location, blob_url, account_id)),
    ]


def client(credential: Any, subscription: str, endpoint: str = ARM_ENDPOINT, *, scope: str = "",
           polling_interval: float = 15.0, client_kwargs: dict[str, Any] | None = None) -> Any:
    from azure.mgmt.compute import ComputeManagementClient

    quiet_sdk_logs()
    base = endpoint.rstrip("/")
    scope = scope or f"{ARM_ENDPOINT if base == ARM_ENDPOINT else base}/.default"
    check_token(credential, scope, f"Azure Resource Manager ({base})")
    return ComputeManagementClient(credential, subscription, base_url=base, credential_scopes=[scope],
                                   polling_interval=polling_interval, **(client_kwargs or {}))


def _wait(poller: Any, what: str) -> Any:
    """Wait for a long-running operation, logging its status now and then. An operation that ends Failed
    (its Azure-AsyncOperation status) is a PublishError with Azure's own error."""
    from azure.core.exceptions import HttpResponseError

    started = time.monotonic()
    try:
        while not poller.done():
            poller.wait(POLL_LOG_SECONDS)
            if not poller.done():
                log.info("%s: %s (%.0f s)", what, poller.status(), time.monotonic() - started)
        return poller.result()
    except HttpResponseError as exc:
        if getattr(exc, "status_code", None) not in (200, 201, 202):
            raise
        msg = azure_message(exc).replace(f"HTTP {exc.status_code}, ", "")
        raise PublishError(f"{what}: the operation ended with provisioning state Failed after "
                           f"{time.monotonic() - started:.0f} s: {msg}") from None


def _arm_error(exc: BaseException, what: str, t: GalleryTarget) -> PublishError:
    from azure.core.exceptions import ClientAuthenticationError, ResourceExistsError, ResourceNotFoundError

    msg = azure_message(exc)
    where = f"resource group {t.resource_group}, subscription {t.subscription}"
    if isinstance(exc, ClientAuthenticationError):
        return PublishError(f"{what}: not authorized: {msg}", hint=CREDENTIAL_HINT)
    if isinstance(exc, ResourceExistsError) or getattr(exc, "status_code", None) == 409:
        return PublishError(f"{what}: Azure refused it as a conflict: {msg}",
                            hint="an operation on it may still be running, or a property that cannot change "
                                 "differs from what exists; check it with: az sig image-version show")
    if isinstance(exc, ResourceNotFoundError):
        return PublishError(f"{what}: not found ({where}): {msg}")
    return PublishError(f"{what}: {msg}")


def _state(resource: Any) -> str:
    state = getattr(getattr(resource, "properties", None), "provisioning_state", "") or ""
    return str(getattr(state, "value", state))


def gallery_location(compute: Any, t: GalleryTarget) -> str:
    """Read the gallery (before any upload: a missing gallery or a refused token is found first); its region."""
    from azure.core.exceptions import AzureError, ResourceNotFoundError

    kw = {"api_version": API_VERSION}
    gallery_name = f"gallery {t.gallery}"
    try:
        gallery = compute.galleries.get(t.resource_group, t.gallery, **kw)
    except ResourceNotFoundError:
        raise PublishError(f"{gallery_name} does not exist in resource group {t.resource_group} (subscription "
                           f"{t.subscription})",
                           hint=f"create it first: az sig create --resource-group {t.resource_group} "
                                f"--gallery-name {t.gallery}") from None
    except AzureError as exc:
        raise _arm_error(exc, gallery_name, t) from None
    location = t.location or str(gallery.location)
    if t.location and gallery.location and t.location != gallery.location:
        raise InputError(f"--location {t.location} differs from {gallery_name}'s location {gallery.location}",
                         hint="leave --location out: gallery resources live in the gallery's region; use "
                              "--target-region to replicate elsewhere")
    return location


def publish_version(compute: Any, t: GalleryTarget, location: str, blob_url: str, account_id: str) -> GalleryResult:
    """Create the image definition when missing, then the image version; idempotent for a version that
    already exists from the same blob and succeeded."""
    from azure.core.exceptions import AzureError, ResourceNotFoundError

    kw = {"api_version": API_VERSION}
    result = GalleryResult(version_id="", state="")
    definition = f"image definition {t.gallery}/{t.definition}"
    try:
        try:
            existing = compute.gallery_images.get(t.resource_group, t.gallery, t.definition, **kw)
        except ResourceNotFoundError:
            existing = None
        if existing is None:
            log.info("creating %s (%s, %s/%s/%s)", definition, HYPERV_GENERATION, t.publisher, t.offer, t.sku)
            poller = compute.gallery_images.begin_create_or_update(
                t.resource_group, t.gallery, t.definition, definition_body(t, location), **kw)
            created = _wait(poller, definition)
            _check_succeeded(created, definition)
            result.definition_created = True
        else:
            _check_definition(existing, definition)
    except AzureError as exc:
        raise _arm_error(exc, definition, t) from None
    version = f"image version {t.gallery}/{t.definition}/{t.version}"
    body = version_body(t, location, blob_url, account_id)
    try:
        try:
            current = compute.gallery_image_versions.get(t.resource_group, t.gallery, t.definition, t.version, **kw)
        except ResourceNotFoundError:
            current = None
        if current is not None and _state(current) == "Succeeded" and _source_uri(current) == blob_url:
            log.info("%s already exists from this blob (Succeeded); nothing to do", version)
            final = current
        else:
            log.info("creating %s from %s", version, blob_url)
            poller = compute.gallery_image_versions.begin_create_or_update(
                t.resource_group, t.gallery, t.definition, t.version, body, **kw)
            final = _wait(poller, version)
            result.version_created = True
        _check_succeeded(final, version)
    except AzureError as exc:
        raise _arm_error(exc, version, t) from None
    result.version_id = str(final.id)
    result.state = _state(final)
    profile = getattr(final.properties, "publishing_profile", None)
    result.regions = [str(r.name) for r in (getattr(profile, "target_regions", None) or [])] or \
        [r["name"] for r in body["properties"]["publishingProfile"]["targetRegions"]]
    return result


def _source_uri(v: Any) -> str:
    try:
        return str(v.properties.storage_profile.os_disk_image.source.uri or "")
    except AttributeError:
        return ""


def _check_succeeded(resource: Any, what: str) -> None:
    state = _state(resource)
    if state and state != "Succeeded":
        raise PublishError(f"{what}: provisioning state {state}")


def _check_definition(d: Any, what: str) -> None:
    p = d.properties
    want = {"os_type": "Linux", "os_state": "Generalized", "hyper_v_generation": HYPERV_GENERATION}
    have = {k: getattr(getattr(p, k, None), "value", getattr(p, k, None)) for k in want}
    wrong = [f"{k}={have[k]} (this image: {v})" for k, v in want.items() if str(have[k] or "").lower() != v.lower()]
    if wrong:
        raise InputError(f"{what} exists but does not fit this image: {', '.join(wrong)}",
                         hint="choose another --image-definition")
