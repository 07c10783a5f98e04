"""The NATS fixtures themselves: a lone JetStream server (dedup by Nats-Msg-Id, survives a
SIGKILL with file storage) and a 3-node cluster that keeps an R3 stream through a node loss."""
from __future__ import annotations

import asyncio
import time

import nats
from nats.js.api import StorageType
from natsfixture import (  # noqa: F401  (fixtures are used by name)
    NatsCluster, NatsServer, nats_cluster, nats_server, stream_messages, wait_stream_count)


async def _quiet(*_args) -> None:
    """No error log for the reconnects a killed node causes."""


async def _add_stream(urls: str, name: str, replicas: int = 1, timeout: float = 15.0) -> None:
    """Create a file-backed stream on subjects `<name>.>`, retrying (bounded) while a fresh
    cluster still places its peers."""
    deadline = time.monotonic() + timeout
    nc = await nats.connect(servers=urls.split(","), connect_timeout=2, error_cb=_quiet)
    try:
        js = nc.jetstream(timeout=5)
        while True:
            try:
                await js.add_stream(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE,
                                    num_replicas=replicas, duplicate_window=120)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _publish(urls: str, subject: str, items: list[tuple[str, bytes]],
                   timeout: float = 15.0) -> list:
    """Publish (msg id, data) pairs in order, each retried until acked (bounded): -> acks."""
    deadline = time.monotonic() + timeout
    nc = await nats.connect(servers=urls.split(","), connect_timeout=2, reconnect_time_wait=0.2,
                            error_cb=_quiet)
    acks = []
    try:
        js = nc.jetstream(timeout=2)
        for msg_id, data in items:
            while True:
                try:
                    acks.append(await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}))
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
    finally:
        await nc.close()
    return acks


def test_single_server_dedups_and_reads_back_in_order(nats_server: NatsServer):
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    asyncio.run(_add_stream(nats_server.url, "EV"))
    acks = asyncio.run(_publish(nats_server.url, "EV.x", [
        ("a", b"one"), ("b", b"two"), ("b", b"two again"), ("c", b"three")]))
    assert [a.duplicate for a in acks] == [None, None, True, None]
    assert [a.seq for a in acks] == [1, 2, 2, 3]

    assert wait_stream_count(nats_server.url, "EV", 3, timeout=5) == 3
    msgs = stream_messages(nats_server.url, "EV")
    assert [(seq, h["Nats-Msg-Id"], data) for seq, h, data in msgs] == [
        (1, "a", b"one"), (2, "b", b"two"), (3, "c", b"three")]


def test_kill_and_restart_keeps_the_stream(nats_server: NatsServer):
    asyncio.run(_add_stream(nats_server.url, "EV"))
    asyncio.run(_publish(nats_server.url, "EV.x", [(f"m{i}", b"%d" % i) for i in range(5)]))
    port, pid = nats_server.port, nats_server.pid

    nats_server.kill()
    assert nats_server.pid is None
    nats_server.restart()
    assert nats_server.port == port and nats_server.pid not in (None, pid)

    msgs = stream_messages(nats_server.url, "EV")
    assert [(seq, data) for seq, _, data in msgs] == [(i + 1, b"%d" % i) for i in range(5)]
    # The dedup window survived too: an old id is still a duplicate.
    [ack] = asyncio.run(_publish(nats_server.url, "EV.x", [("m0", b"again")]))
    assert ack.duplicate and ack.seq == 1
    assert "Server is ready" in nats_server.log()


def test_cluster_keeps_an_r3_stream_through_a_node_loss(nats_cluster: NatsCluster):
    assert len(nats_cluster.servers) == 3
    assert nats_cluster.urls == ",".join(s.url for s in nats_cluster.servers)
    asyncio.run(_add_stream(nats_cluster.urls, "EV", replicas=3))
    asyncio.run(_publish(nats_cluster.urls, "EV.x", [(f"m{i}", b"%d" % i) for i in range(10)]))

    nats_cluster.servers[0].kill()
    asyncio.run(_publish(nats_cluster.urls, "EV.x",
                         [(f"m{i}", b"%d" % i) for i in range(10, 20)]))

    msgs = stream_messages(nats_cluster.urls, "EV")
    assert [(seq, h["Nats-Msg-Id"], data) for seq, h, data in msgs] == [
        (i + 1, f"m{i}", b"%d" % i) for i in range(20)]
