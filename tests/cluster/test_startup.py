"""Starting a node or worker against Redis or S3 that cannot be used: one clear line and exit code 2.

Also what happens when S3 goes away under a running node: a 503 the client may retry, never a 500.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.cluster.client import new_uuid, png, post
from tests.cluster.nodes import cluster
from tests.support.services import S3Server, free_port

START_TIMEOUT = 60


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "upscale_server", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("upscale-server: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["serve", "--role", "api"], ["worker"]])
def test_unreachable_redis_is_one_line_and_exit_2(command: list[str], cluster_settings: dict[str, str]) -> None:
    env = {**cluster_settings, "UPSCALE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    assert_one_line(run_cli([*command, "--port", str(free_port())], env), "Redis", "unreachable")


def test_a_missing_bucket_is_one_line_and_exit_2(cluster_settings: dict[str, str]) -> None:
    env = {**cluster_settings, "UPSCALE_S3_BUCKET": "no-such-bucket-here"}
    assert_one_line(run_cli(["serve", "--role", "api"], env), "no-such-bucket-here", "does not exist")


def test_refused_credentials_are_one_line_and_exit_2(cluster_settings: dict[str, str]) -> None:
    env = {**cluster_settings, "AWS_SECRET_ACCESS_KEY": "wrong"}
    assert_one_line(run_cli(["worker"], env), "refused the credentials", "AWS_SECRET_ACCESS_KEY")


def test_an_unreachable_s3_endpoint_is_one_line_and_exit_2(cluster_settings: dict[str, str]) -> None:
    env = {**cluster_settings, "UPSCALE_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    assert_one_line(run_cli(["serve", "--role", "api"], env), "unreachable")


def test_a_cluster_role_without_redis_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {"UPSCALE_REDIS_URL": "", "UPSCALE_ENGINE": "resize"}
    result = run_cli(["serve", "--role", "api", "--data-dir", str(tmp_path)], env)
    assert_one_line(result, "UPSCALE_REDIS_URL")


def test_s3_gone_under_a_running_node_is_a_503_never_a_500(tmp_path: Path, cluster_settings: dict[str, str]) -> None:
    with S3Server(tmp_path / "s3") as own_s3:
        bucket = own_s3.create_bucket("gone-soon")
        env = {**cluster_settings, **own_s3.env(), "UPSCALE_S3_BUCKET": bucket}
        with cluster(tmp_path, env) as running:
            node = running.add("api", "api-a")
            own_s3.stop()
            upload = post(node, [{"taskType": "imageUpload", "taskUUID": new_uuid(), "image": png()}])
            assert upload.status_code == 503, upload.text
            error = upload.json()["errors"][0]
            assert error["code"] == "serviceUnavailable" and "S3" in error["message"]
            ready = httpx.get(node.url + "/ready", timeout=30)
            assert ready.status_code == 503 and ready.json()["failing"] == ["s3"]
            assert "Traceback" not in node.log()
