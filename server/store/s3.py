"""S3 as the standard environment configures it: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`: an S3-compatible
server; `http://` for plain HTTP), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`
or `AWS_DEFAULT_REGION`, `AWS_MAX_ATTEMPTS` (tries of one request, 3 unless set): pyarrow's filesystem for reads
and writes, and a boto3 client for what pyarrow cannot do."""

from __future__ import annotations

import os
from functools import cache
from typing import Any
from urllib.parse import ParseResult, urlparse

import pyarrow.fs as pafs

from ..errors import ConfigError


def _endpoint() -> ParseResult | None:
    """The S3 endpoint of the environment (`https://` if it names no scheme), None for AWS's own."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return urlparse(endpoint if "://" in endpoint else f"https://{endpoint}") if endpoint else None


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for the environment's endpoint, credentials and region."""
    env = os.environ
    options: dict[str, object] = {}
    endpoint = _endpoint()
    if endpoint:
        options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                       session_token=env.get("AWS_SESSION_TOKEN"))
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    attempts = _max_attempts()
    if attempts is not None:
        options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
    return pafs.S3FileSystem(**options)  # type: ignore[arg-type]


def _max_attempts() -> int | None:
    """`AWS_MAX_ATTEMPTS`, as boto3 reads it: how many times one request is tried before it fails (our own retry
    window, SIGIL_FEED_STORAGE_RETRY_S, then goes on from there); None when it is not set."""
    text = os.environ.get("AWS_MAX_ATTEMPTS", "").strip()
    if not text:
        return None
    if not (text.isdigit() and int(text) >= 1):
        raise ConfigError(f"{text!r} is not a whole number of tries", key="AWS_MAX_ATTEMPTS",
                          fix="set it to 1 or more, or unset it for 3")
    return int(text)


def s3_client() -> Any:
    """A boto3 S3 client for the environment's endpoint, region and credentials (the `s3` extra), for what pyarrow
    cannot do: conditional requests (the build lease), listings with ETags (remote sources)."""
    env = os.environ
    endpoint = _endpoint()
    return _s3_client(endpoint.geturl() if endpoint else None, env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
                      env.get("AWS_ACCESS_KEY_ID"))


@cache
def _s3_client(endpoint: str | None, region: str | None, key_id: str | None) -> Any:
    """One thread-safe client per environment (key_id only tells environments apart: boto3 reads the credentials
    from the environment itself)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=region)
