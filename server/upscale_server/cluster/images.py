"""Stored images in a cluster: the bytes in S3, their index in Redis (a hash each plus an expiry index).

The same life as on one node: 30 days after the last use, capped by an explicit ``ttl``. The object is
written before its index entry, so an image that can be found can be read; the sweeper deletes the
object first and the index entry second. A re-run of a task writes the same image UUID again (the
job carries it): the object is simply replaced by identical bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import cast

import redis

from upscale_server.cluster import scripts
from upscale_server.cluster.connect import translated
from upscale_server.cluster.keys import Keys
from upscale_server.cluster.objects import Bucket
from upscale_server.storage import ImageKind, StoredImage, image_uuid_for, ttl_cap
from upscale_server.vocabulary import ImageFormat, canonical_uuid

log = logging.getLogger(__name__)

#: Images the sweeper deletes per round; the next round takes the rest.
SWEEP_BATCH = 500


class S3ImageStore:
    """:class:`~upscale_server.storage.ImageStorage` on S3 and Redis; blocking, thread-safe."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        bucket: Bucket,
        *,
        retention_seconds: float,
        presign_seconds: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self.bucket = bucket
        self.retention_seconds = retention_seconds
        self.presign_seconds = presign_seconds
        self._clock = clock
        self._put_index = client.register_script(scripts.PUT_IMAGE)
        self._drop_index = client.register_script(scripts.DROP_IMAGE)

    @staticmethod
    def object_key(image_uuid: str, fmt: ImageFormat) -> str:
        return f"images/{image_uuid}.{fmt.extension}"

    @translated("image index (Redis)")
    def put(
        self,
        data: bytes,
        *,
        format: ImageFormat,
        kind: ImageKind,
        ttl_seconds: float | None = None,
        image_uuid: str | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> StoredImage:
        image_uuid = image_uuid_for(image_uuid)
        now = self._clock()
        cap = ttl_cap(now, ttl_seconds)
        expires = self._expiry(now, cap)
        self.bucket.put(self.object_key(image_uuid, format), data, format.media_type)
        fields = {
            "format": format.value,
            "kind": kind,
            "size": len(data),
            "width": width or "",
            "height": height or "",
            "created": now,
            "used": now,
            "cap": "" if cap is None else cap,
        }
        pairs = [part for item in fields.items() for part in item]
        self._put_index(
            keys=[self.keys.image(image_uuid), self.keys.image_expiry, self.keys.image_stats],
            args=[image_uuid, expires, len(data), *pairs],
        )
        return StoredImage(image_uuid, format, kind, len(data), width, height, now, now, expires)

    @translated("image index (Redis)")
    def get(self, image_uuid: str, *, touch: bool = True) -> StoredImage | None:
        canonical = canonical_uuid(image_uuid)
        if canonical is None:
            return None
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.image(canonical))
            pipe.zscore(self.keys.image_expiry, canonical)
            fields, expires = cast(tuple[dict[str, str], float | None], tuple(pipe.execute()))
        now = self._clock()
        if not fields or expires is None or expires <= now:
            return None
        fmt = ImageFormat.from_wire(fields["format"])
        if fmt is None:
            return None
        used = float(fields["used"])
        if touch:
            cap = float(fields["cap"]) if fields.get("cap") else None
            expires = self._expiry(now, cap)
            used = now
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(self.keys.image(canonical), "used", now)
                pipe.zadd(self.keys.image_expiry, {canonical: expires}, xx=True)
                pipe.execute()
        return StoredImage(
            uuid=canonical,
            format=fmt,
            kind=cast(ImageKind, fields.get("kind", "upload")),
            size_bytes=int(fields.get("size", 0)),
            width=int(fields["width"]) if fields.get("width") else None,
            height=int(fields["height"]) if fields.get("height") else None,
            created_at=float(fields["created"]),
            last_used_at=used,
            expires_at=expires,
        )

    def _expiry(self, last_used: float, cap: float | None) -> float:
        """The retention after the last use, capped by the image's explicit ttl."""
        expires = last_used + self.retention_seconds
        return expires if cap is None else min(expires, cap)

    def read_bytes(self, image: StoredImage) -> bytes:
        return self.bucket.get(self.object_key(image.uuid, image.format))

    def presigned_url(self, image: StoredImage) -> str | None:
        if not self.presign_seconds:
            return None
        return self.bucket.presigned_get(self.object_key(image.uuid, image.format), self.presign_seconds)

    @translated("image index (Redis)")
    def sweep(self, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        expired = cast(list[str], self.client.zrangebyscore(self.keys.image_expiry, "-inf", now, 0, SWEEP_BATCH))
        removed = 0
        for image_uuid in expired:
            fmt = ImageFormat.from_wire(str(self.client.hget(self.keys.image(image_uuid), "format") or ""))
            if fmt is not None:
                self.bucket.delete(self.object_key(image_uuid, fmt))
            removed += int(
                self._drop_index(
                    keys=[self.keys.image(image_uuid), self.keys.image_expiry, self.keys.image_stats],
                    args=[image_uuid, now],
                )
            )
        if removed:
            log.info("swept %d expired images", removed)
        return removed

    @translated("image index (Redis)")
    def stats(self) -> tuple[int, int]:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.image_expiry)
            pipe.hget(self.keys.image_stats, "bytes")
            count, size = pipe.execute()
        return int(count), int(size or 0)

    def check(self) -> None:
        """Reach Redis and the bucket (readiness)."""
        self.client.ping()
        self.bucket.check()
