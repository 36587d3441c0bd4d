"""The cluster's stores on their own, against the real Redis and S3: the same life rules as on one node.

Images live 30 days after their last use (capped by an explicit ``ttl``), results stay pollable for the
result TTL, a taskUUID is taken once, and only the first finisher records. Clocks are fakes.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
import redis

from tests.cluster.conftest import ClusterNames
from tests.support.services import RedisServer, S3Server
from upscale_server.cluster.connect import open_redis
from upscale_server.cluster.images import S3ImageStore
from upscale_server.cluster.keys import Keys
from upscale_server.cluster.objects import Bucket
from upscale_server.cluster.records import RedisTaskRecords
from upscale_server.vocabulary import ImageFormat

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    return open_redis(redis_server.url)


@pytest.fixture
def bucket(s3_server: S3Server, cluster_names: ClusterNames) -> Bucket:
    return Bucket(s3_server.client(), cluster_names.bucket, "pre/")


def test_an_image_lives_thirty_days_after_its_last_use_capped_by_its_ttl(
    client: redis.Redis, bucket: Bucket, cluster_names: ClusterNames
) -> None:
    clock = Clock()
    store = S3ImageStore(client, Keys(cluster_names.redis_prefix), bucket, retention_seconds=30 * DAY, clock=clock)
    kept = store.put(b"png bytes", format=ImageFormat.PNG, kind="upload", width=4, height=3)
    capped = store.put(b"jpg bytes", format=ImageFormat.JPG, kind="output", ttl_seconds=40 * DAY)
    assert store.stats() == (2, len(b"png bytes") + len(b"jpg bytes"))
    assert store.read_bytes(kept) == b"png bytes"
    assert bucket.get(f"images/{kept.uuid}.png") == b"png bytes"  # under the deployment's key prefix

    clock.now += 29 * DAY
    assert store.get(kept.uuid) is not None and store.get(capped.uuid) is not None  # a use: both refreshed
    clock.now += 29 * DAY  # 58 days: the first lives on (used at day 29); the second's 40-day cap has passed
    assert store.get(kept.uuid, touch=False) is not None
    assert store.get(capped.uuid) is None
    assert store.sweep() == 1
    with pytest.raises(FileNotFoundError):
        bucket.get(f"images/{capped.uuid}.jpg")  # the object went with its index entry
    assert store.stats() == (1, len(b"png bytes"))
    clock.now += 31 * DAY
    assert store.get(kept.uuid) is None and store.sweep() == 1 and store.stats() == (0, 0)
    assert store.get("not-a-uuid") is None and store.get(str(uuid.uuid4())) is None


def test_an_image_written_twice_under_one_uuid_is_one_image(
    client: redis.Redis, bucket: Bucket, cluster_names: ClusterNames
) -> None:
    """A re-run of a job writes its output again under the UUID the job carries."""
    store = S3ImageStore(client, Keys(cluster_names.redis_prefix), bucket, retention_seconds=DAY)
    image_uuid = str(uuid.uuid4())
    store.put(b"same", format=ImageFormat.WEBP, kind="output", image_uuid=image_uuid)
    store.put(b"same", format=ImageFormat.WEBP, kind="output", image_uuid=image_uuid)
    assert store.stats() == (1, 4)


def test_presigned_urls_fetch_the_object_directly(
    client: redis.Redis, bucket: Bucket, cluster_names: ClusterNames
) -> None:
    store = S3ImageStore(client, Keys(cluster_names.redis_prefix), bucket, retention_seconds=DAY, presign_seconds=60)
    image = store.put(b"\x89PNG fake", format=ImageFormat.PNG, kind="upload")
    url = store.presigned_url(image)
    assert url is not None and cluster_names.bucket in url
    assert httpx.get(url, timeout=10).content == b"\x89PNG fake"
    unsigned = S3ImageStore(client, Keys(cluster_names.redis_prefix), bucket, retention_seconds=DAY)
    assert unsigned.presigned_url(image) is None


def test_records_claim_once_finish_once_and_expire_with_the_result_ttl(
    client: redis.Redis, cluster_names: ClusterNames
) -> None:
    keys = Keys(cluster_names.redis_prefix)
    records = RedisTaskRecords(client, keys, node="api-a", result_ttl_seconds=3600)
    task_uuid = str(uuid.uuid4())
    assert records.claim(task_uuid, "imageUpload", "sync")
    assert not records.claim(task_uuid, "imageUpload", "sync")  # conflictTaskUUID, on any node
    record = records.get(task_uuid)
    assert record is not None and record.status == "processing" and record.item is None
    assert records.complete(task_uuid, {"imageUUID": "first"})
    assert not records.fail(task_uuid, {"code": "late"})  # the first outcome stays
    record = records.get(task_uuid)
    assert record is not None and record.status == "success" and record.item == {"imageUUID": "first"}
    assert 3590 <= client.ttl(keys.task(task_uuid)) <= 3600  # pollable (and taken) for the result TTL
    assert record.expires_at is not None and record.finished_at is not None
    assert record.expires_at - record.finished_at == 3600
    assert not records.complete(str(uuid.uuid4()), {"imageUUID": "never claimed"})
    assert records.fail_unfinished(lambda record: {}) == 0  # open cluster tasks are re-run, never interrupted
