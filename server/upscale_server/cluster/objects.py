"""Objects in the S3 bucket under the deployment's key prefix: images and large job payloads."""

from __future__ import annotations

from typing import Any

from upscale_server.cluster.connect import translated


class Bucket:
    """Blocking S3 operations (boto3's client is thread-safe); failures become 503s."""

    def __init__(self, client: Any, name: str, prefix: str) -> None:
        self.client = client
        self.name = name
        self.prefix = prefix

    @translated("object store (S3)")
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(Bucket=self.name, Key=self.prefix + key, Body=data, ContentType=content_type)

    @translated("object store (S3)")
    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when it does not exist."""
        try:
            response = self.client.get_object(Bucket=self.name, Key=self.prefix + key)
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        body: bytes = response["Body"].read()
        return body

    @translated("object store (S3)")
    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=self.prefix + key)

    def presigned_get(self, key: str, seconds: int) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.name, "Key": self.prefix + key}, ExpiresIn=seconds
        )
        return url

    @translated("object store (S3)")
    def check(self) -> None:
        self.client.head_bucket(Bucket=self.name)
