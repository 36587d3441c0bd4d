"""Every Redis key of a deployment, derived from one prefix.

The default prefix holds a hash tag (``{u}``): on a Redis Cluster every key then lives in one slot,
which the Lua scripts need (they touch a task, the job stream and a session in one call).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The consumer group every worker reads the job stream in.
WORKERS_GROUP = "workers"


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def jobs(self) -> str:
        """Stream of queued and running jobs (``task`` field); acked and deleted when done."""
        return self.prefix + "jobs"

    @property
    def dead_letters(self) -> str:
        """Stream of tasks that crashed their workers too often."""
        return self.prefix + "dlq"

    @property
    def stats(self) -> str:
        """Hash of cluster-wide counters (redeliveries, dead-lettered)."""
        return self.prefix + "stats"

    @property
    def workers(self) -> str:
        """Sorted set of worker ids by their last heartbeat (unix seconds)."""
        return self.prefix + "workers"

    def task(self, task_uuid: str) -> str:
        return f"{self.prefix}task:{task_uuid}"

    def node(self, node_id: str) -> str:
        """The pub/sub channel a node listens on for its wake-ups."""
        return f"{self.prefix}node:{node_id}"

    def session(self, session_uuid: str) -> str:
        return f"{self.prefix}sess:{session_uuid}"

    def session_frames(self, session_uuid: str) -> str:
        return f"{self.prefix}sess:{session_uuid}:out"

    def image(self, image_uuid: str) -> str:
        return f"{self.prefix}img:{image_uuid}"

    @property
    def image_expiry(self) -> str:
        """Sorted set of image UUIDs by the time they expire."""
        return self.prefix + "img:exp"

    @property
    def image_stats(self) -> str:
        return self.prefix + "img:stats"
