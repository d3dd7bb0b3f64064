"""An S3-compatible bucket holding a cluster's templates (optional: `--layer-bucket s3://BUCKET/PREFIX`, with
`--s3-endpoint URL` for a store other than AWS; credentials as boto3 finds them: $AWS_ACCESS_KEY_ID and
$AWS_SECRET_ACCESS_KEY, a profile, an instance role). Nodes put the templates they hold there (cluster/layers.py),
so a node can fetch one even when no node that holds it is alive:

    PREFIX/layers/<key>.tar              a layer's content, a tar stream (templates/transfer.py)
    PREFIX/manifests/<quoted name>.json  a template's manifest (its default build), under its ID and each name
                                         (deleted with the template)

A layer no manifest names any more goes once it is older than COLLECT_GRACE (a node puts a template's layers
before its manifest: a young layer may be one whose manifest is on its way); each node with the bucket looks every
COLLECT_SECONDS (`collect`).

What is read from the bucket is checked as what comes from a node is: each layer against the digest the state
recorded for its key.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import quote, urlsplit

CHUNK = 1 << 20
MAX_MANIFEST = 4 * 1024 * 1024
COLLECT_SECONDS = 600.0
COLLECT_GRACE = 3600.0  # s


class BucketError(Exception):
    """The bucket cannot be used: what, and why."""


class Bucket:
    def __init__(self, url: str, endpoint: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise BucketError(f"--layer-bucket {url!r}: give it as s3://BUCKET/PREFIX")
        import boto3
        from botocore.config import Config

        self.name = parts.netloc
        self.prefix = parts.path.strip("/") + "/" if parts.path.strip("/") else ""
        self.url = f"s3://{self.name}/{self.prefix}"
        self.s3: Any = boto3.client(
            "s3",
            endpoint_url=endpoint,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"}),
        )

    def _layer_key(self, key: str) -> str:
        return f"{self.prefix}layers/{key}.tar"

    def _manifest_key(self, name: str) -> str:
        return f"{self.prefix}manifests/{quote(name, safe='')}.json"

    def has_layer(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=self.name, Key=self._layer_key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put_layer(self, key: str, stream: IO[bytes], digest: str) -> None:
        """The layer's tar from `stream` (read to its end; uploaded in parts as it comes)."""
        self.s3.upload_fileobj(stream, self.name, self._layer_key(key), ExtraArgs={"Metadata": {"digest": digest}})

    @contextlib.contextmanager
    def layer(self, key: str) -> Iterator[Iterator[bytes]]:
        from botocore.exceptions import ClientError

        try:
            body = self.s3.get_object(Bucket=self.name, Key=self._layer_key(key))["Body"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise BucketError(
                    f"layer {key} is not in {self.url} (the built-in templates' layers are not put there: every "
                    "node's setup builds them)"
                ) from None
            raise
        try:
            yield body.iter_chunks(CHUNK)
        finally:
            body.close()

    def put_manifest(self, names: list[str], manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest).encode()
        for name in names:
            self.s3.put_object(
                Bucket=self.name, Key=self._manifest_key(name), Body=data, ContentType="application/json"
            )

    def forget(self, names: list[str]) -> None:
        """The manifests under these names go (the layers stay: other templates may stand on them)."""
        for name in names:
            self.s3.delete_object(Bucket=self.name, Key=self._manifest_key(name))

    def collect(self, grace: float = COLLECT_GRACE) -> list[str]:
        """The layers no manifest names, older than `grace` seconds, deleted; their keys. A manifest that cannot be
        read stops it (BucketError) before anything is deleted."""
        named: set[str] = set()
        for obj in self._objects("manifests/"):
            try:
                manifest = self._manifest_at(obj["Key"], obj["Key"])
            except (BucketError, ValueError) as e:  # (what it names is not known: nothing is deleted)
                raise BucketError(f"{obj['Key']} in {self.url} cannot be read ({e}): no layer collected") from None
            if manifest is None:
                continue  # (deleted meanwhile)
            for entry in manifest.get("layers") or []:
                if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                    named.add(entry["key"])
            memory = manifest.get("memory")
            if isinstance(memory, dict) and isinstance(memory.get("key"), str):
                named.add(memory["key"])
        gone = []
        now = time.time()
        start = f"{self.prefix}layers/"
        for obj in self._objects("layers/"):
            key = obj["Key"][len(start) :].removesuffix(".tar")
            if key in named or now - obj["LastModified"].timestamp() < grace:
                continue
            self.s3.delete_object(Bucket=self.name, Key=obj["Key"])
            gone.append(key)
        return gone

    def _objects(self, under: str) -> Iterator[dict[str, Any]]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=self.prefix + under):
            yield from page.get("Contents", [])

    def manifest(self, name: str) -> dict[str, Any] | None:
        return self._manifest_at(self._manifest_key(name), name)

    def _manifest_at(self, object_key: str, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.s3.get_object(Bucket=self.name, Key=object_key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        body = got["Body"]
        try:
            if int(got.get("ContentLength") or 0) > MAX_MANIFEST:
                raise BucketError(f"the manifest of {name!r} in {self.url} is over {MAX_MANIFEST} bytes")
            value = json.loads(body.read(MAX_MANIFEST + 1))
        finally:
            body.close()
        if not isinstance(value, dict):
            raise BucketError(f"the manifest of {name!r} in {self.url} is not an object")
        return value
