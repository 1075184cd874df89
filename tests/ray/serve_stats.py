"""Helpers shared by the Ray tests: the decode replica's stats and the wait for its
baseline (every block free, nothing queued or streaming) after a test's requests."""
from __future__ import annotations

import time


def decode_stats(app_name: str = "kvarn") -> dict:
    """The decode replica's ``stats()`` (blocks, queues, streams) of a deployed app."""
    from ray import serve

    return serve.get_deployment_handle("DecodeServer", app_name=app_name).stats.remote().result(timeout_s=60)


def wait_for_baseline(timeout_s: float = 60.0, app_name: str = "kvarn") -> dict:
    """Poll the decode replica until every block is free and no request is in flight."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = decode_stats(app_name)
        if (s["num_free_blocks"] == s["baseline_free_blocks"] and not s["has_unfinished_requests"]
                and s["num_reserved"] == 0 and s["num_waiting"] == 0 and s["num_streams"] == 0):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"decode replica did not return to baseline: {s}")
        time.sleep(0.2)
