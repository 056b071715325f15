"""What a remote path holds: each object's path, size and, where the listing gives it, its ETag.

pyarrow's listings give sizes and times only, so a source's identity would cost a HEAD request per object (2,000
objects: seconds, at every start and every epoch). On S3, with boto3 installed (the `s3` extra), objects are listed
with ListObjectsV2 instead: up to 1,000 objects a request, each with the ETag a HEAD request gives. Elsewhere (gs://,
hf://, S3 without boto3) the listing is pyarrow's and the ETag is left to a HEAD request when an identity is asked
for (remote.py).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow.fs as pafs

from ...store.s3 import s3_client

T = TypeVar("T")


@dataclass(frozen=True)
class Listed:
    """One object: its path on the filesystem (`bucket/key`), its size, its ETag (None if the listing has none)."""

    path: str
    size: int
    tag: str | None = None

    @property
    def base_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=1)
def _has_boto3() -> bool:
    return importlib.util.find_spec("boto3") is not None


def _by_s3(fs: pafs.FileSystem) -> bool:
    """Whether a filesystem's objects are listed with boto3 (S3, boto3 installed)."""
    return isinstance(fs, pafs.S3FileSystem) and _has_boto3()


def entry(fs: pafs.FileSystem, path: str) -> Listed | pafs.FileType:
    """What a path (no glob) names: a file as Listed, else FileType.Directory or FileType.NotFound."""
    if not _by_s3(fs):
        info = fs.get_file_info(path)
        return Listed(info.path, info.size) if info.type == pafs.FileType.File else info.type
    bucket, _, key = path.partition("/")
    if key and not key.endswith("/"):
        first = _s3_page(bucket, key, MaxKeys=1)
        found = first.get("Contents", [])
        if found and found[0]["Key"] == key:  # the shortest key with the prefix lists first
            return Listed(path, int(found[0]["Size"]), str(found[0]["ETag"]))
    folder = f"{key.rstrip('/')}/" if key.strip("/") else ""
    page = _s3_page(bucket, folder, MaxKeys=1, Delimiter="/")
    if page.get("Contents") or page.get("CommonPrefixes") or (not folder and page.get("Name")):
        return pafs.FileType.Directory
    return pafs.FileType.NotFound


def files_under(fs: pafs.FileSystem, root: str, *, recursive: bool) -> list[Listed]:
    """The files under a folder (recursive: at any depth; else directly in it); none if it is not there."""
    if not _by_s3(fs):
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
        return [Listed(i.path, i.size) for i in infos if i.type == pafs.FileType.File]
    bucket, _, key = root.partition("/")
    prefix = f"{key.strip('/')}/" if key.strip("/") else ""
    options = {} if recursive else {"Delimiter": "/"}
    pages: list[dict[str, Any]] = _s3_call(lambda: list(s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, **options)), missing=[])
    return [Listed(f"{bucket}/{obj['Key']}", int(obj["Size"]), str(obj["ETag"]))
            for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]


def _s3_page(bucket: str, prefix: str, **options: Any) -> dict[str, Any]:
    """One ListObjectsV2 page (empty if the bucket is not there)."""
    page: dict[str, Any] = _s3_call(lambda: s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, **options),
                                    missing={})
    return page


def _s3_call(call: Callable[[], T], *, missing: T) -> T:
    """`call()`, boto3's errors as pyarrow's would be: `missing` for a bucket that is not there, PermissionError for
    a refusal, OSError for the rest (tried again, remote.retrying)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return call()
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code"))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404") or status == 404:
            return missing
        if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PermissionError(f"S3 refused the listing: {code}") from err
        raise OSError(f"S3 listing failed: {code} (HTTP {status})") from err
    except NoCredentialsError as err:
        raise PermissionError(f"S3 listing: {err}") from err
    except BotoCoreError as err:  # connection and timeout errors
        raise OSError(f"S3 listing failed: {type(err).__name__}: {err}") from err
