"""The long reliability run: steady load, hostile input, crashes; then count what was lost.

    python bench/reliability.py                  # ~5 minutes: 180 s soak + 5 kill -9 rounds
    python bench/reliability.py --soak 60 --kills 2   # shorter

Loopback only, bounded in time, stops by itself; it ends only the servers it started. Phases:
1. Soak: otserver under a steady rate of realistic events from keep-alive clients, while another
   client sends a rotating corpus of hostile requests (smuggling shapes, oversized parts, bad
   encodings, bad properties). Every few seconds: the server's RSS and the store's file size.
   At the end: events stored == events acknowledged, and no refused request stored anything.
2. Crashes: rounds of load, then SIGKILL of the server mid-load and a restart on the same data
   directory; every acknowledged event must be there after each restart.
Prints a summary and writes bench/results/reliability.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otserver.store import Store  # noqa: E402

LISTENING = re.compile(r"listening on http://[^:]+:(\d+)")

HOSTILE = [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nsi=",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nsi=a\r\n0\r\n\r\n",
    b"GET /?si=a HTTP/1.1\r\nHost: x\r\n folded: header\r\n\r\n",
    b"GET /?si=a HTTP/1.1\nHost: x\n\n",
    b"GET /?si=a HTTP/1.1\r\nHo\x00st: x\r\n\r\n",
    b"GET /?si=a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /?si=a\r\n\r\n",
    b"GET /?si=a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?si=a HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n",
    b"GET /?si=a HTTP/1.1\r\nX-Big: " + b"z" * 20000 + b"\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n",
    b"GET /?" + b"&".join(b"p%d=1" % i for i in range(300)) + b"&si=a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?si=a&name=%zz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?si=a&name=%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?si=a&eid=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?si=a&unixtimestamp=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?message=no-site HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?si=a&bad%20name=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello's start
    b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /batch HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 15\r\n\r\nsi=a\nsi=b&eid=x",
]


class Server:
    def __init__(self, data_dir: str, log_path: str):
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc = None
        self.port = 0

    def start(self) -> None:
        log = open(self.log_path, "ab")
        offset = log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otserver", "serve", "--host", "127.0.0.1", "--port", "0",
             "--data-dir", self.data_dir], stdout=log, stderr=log, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = LISTENING.search(Path(self.log_path).read_bytes()[offset:].decode(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def memory_mb(self) -> dict:
        """RSS split: anonymous (the process's own memory) and file (the mapped store's pages,
        which grow with the store and belong to the page cache)."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            for key, name in (("VmRSS:", "rss_mb"), ("RssAnon:", "anon_mb"), ("RssFile:", "file_rss_mb")):
                if line.startswith(key):
                    out[name] = round(int(line.split()[1]) / 1024, 1)
        return out

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    return int(head[9:12]), rest[:length]


def client(port: int, rate: float, until: float, acked: list, counts: dict, seed: int) -> None:
    """Keep-alive client sending realistic events at about `rate` per second."""
    rand = random.Random(seed)
    sock = None
    next_at = time.monotonic()
    while time.monotonic() < until:
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            session = rand.randrange(5000)
            target = (f"/?si=soak.example&sid=s{session}&uid=u{session % 1000}&ev=pageview"
                      f"&url=%2Fp%2F{rand.randrange(100)}&title=Soak%20test")
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nUser-Agent: soak\r\n\r\n".encode())
            status, body = read_response(sock)
            counts[status] = counts.get(status, 0) + 1
            if status == 200:
                acked.append(body.decode())
        except (OSError, ConnectionError):
            counts["connection_errors"] = counts.get("connection_errors", 0) + 1
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.05)
        next_at += 1 / rate
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    if sock is not None:
        sock.close()


def hostile(port: int, until: float, answers: dict) -> int:
    sent = 0
    while time.monotonic() < until:
        payload = HOSTILE[sent % len(HOSTILE)]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(payload)
                sock.settimeout(5)
                data = sock.recv(200)
            status = data[9:12].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
        except OSError:
            status = "closed"
        answers[status] = answers.get(status, 0) + 1
        sent += 1
        time.sleep(0.02)
    return sent


def stored_eids(data_dir: str) -> set[str]:
    store = Store(data_dir, readonly=True)
    try:
        return set(store.event_ids())
    finally:
        store.close()


def soak(data_dir: str, log: str, seconds: float, rate: float, clients: int) -> dict:
    server = Server(data_dir, log)
    server.start()
    acked: list[str] = []
    counts: dict = {}
    answers: dict = {}
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(server.port, rate / clients, until, acked,
                                                     counts, i)) for i in range(clients)]
    hostile_sent = [0]
    hostile_thread = threading.Thread(
        target=lambda: hostile_sent.__setitem__(0, hostile(server.port, until, answers)))
    for t in threads + [hostile_thread]:
        t.start()
    samples = []
    started = time.monotonic()
    while time.monotonic() < until:
        time.sleep(min(5.0, max(0.0, until - time.monotonic())))
        samples.append({"t": round(time.monotonic() - started), **server.memory_mb(),
                        "file_mb": round(sum(os.path.getsize(os.path.join(data_dir, env, "data.mdb"))
                                             for env in ("log", "views")) / 2**20, 1),
                        "acked": len(acked)})
        x = samples[-1]
        print(f"  soak t={x['t']}s acked={len(acked)} rss={x['rss_mb']} MB "
              f"(anonymous {x['anon_mb']} MB, mapped store {x['file_rss_mb']} MB) "
              f"file={x['file_mb']} MB", flush=True)
    for t in threads + [hostile_thread]:
        t.join(30)
    code = server.stop()
    stored = stored_eids(data_dir)
    acked_set = set(acked)
    return {
        "seconds": seconds, "target_rate": rate, "achieved_rate": round(len(acked) / seconds, 1),
        "acknowledged": len(acked), "stored": len(stored), "lost": len(acked_set - stored),
        "stored_unacknowledged": len(stored - acked_set), "answers": counts,
        "hostile_sent": hostile_sent[0], "hostile_answers": answers, "exit_code": code,
        "samples": samples,
    }


def crashes(data_dir: str, log: str, rounds: int, rate: float, clients: int) -> dict:
    server = Server(data_dir, log)
    acked: list[str] = []
    lost_per_round = []
    for round_ in range(rounds):
        server.start()
        counts: dict = {}
        until = time.monotonic() + 4.0
        threads = [threading.Thread(target=client, args=(server.port, rate / clients, until,
                                                         acked, counts, 1000 * round_ + i))
                   for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(2.0 + random.random())
        server.kill()
        for t in threads:
            t.join(30)
        stored = stored_eids(data_dir)
        lost = len(set(acked) - stored)
        lost_per_round.append(lost)
        print(f"  kill -9 round {round_ + 1}: acknowledged so far {len(acked)}, lost {lost}",
              flush=True)
    server.start()
    server.stop()
    return {"rounds": rounds, "acknowledged": len(acked), "lost_per_round": lost_per_round,
            "lost": sum(lost_per_round)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak", type=float, default=180, help="soak seconds")
    parser.add_argument("--rate", type=float, default=2000, help="events per second in the soak")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kills", type=int, default=5, help="kill -9 rounds")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reliability.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="otrel-") as tmp:
        print(f"soak: {args.soak:.0f} s at {args.rate:.0f} events/s with hostile input", flush=True)
        soak_result = soak(os.path.join(tmp, "soak"), os.path.join(tmp, "soak.log"),
                           args.soak, args.rate, args.clients)
        print(f"crashes: {args.kills} rounds of kill -9 under load", flush=True)
        crash_result = crashes(os.path.join(tmp, "crash"), os.path.join(tmp, "crash.log"),
                               args.kills, args.rate, args.clients)
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "soak": soak_result, "crashes": crash_result,
              "events_lost": soak_result["lost"] + crash_result["lost"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    s, c = soak_result, crash_result
    rss = [x["rss_mb"] for x in s["samples"]]
    anon = [x["anon_mb"] for x in s["samples"]]
    files = [x["file_mb"] for x in s["samples"]]
    half = len(anon) // 2
    print(f"""
soak        {s['seconds']:.0f} s, {s['achieved_rate']} events/s acknowledged (target {s['target_rate']:.0f})
            {s['acknowledged']} acknowledged, {s['stored']} stored, lost {s['lost']}
            RSS {min(rss)}-{max(rss)} MB, of it anonymous {min(anon)}-{max(anon)} MB
            (second half {min(anon[half:])}-{max(anon[half:])} MB); store file {min(files)}-{max(files)} MB
            (the store grows with the data: nothing is older than the 60-day TTL in a soak)
hostile     {s['hostile_sent']} bad requests: {s['hostile_answers']}; stored from them: {s['stored_unacknowledged']}
crashes     {c['rounds']} kill -9 rounds, {c['acknowledged']} acknowledged, lost {c['lost']}
exit        {s['exit_code']} after SIGTERM
events lost {result['events_lost']}
wrote {args.out}""")
    return 0 if result["events_lost"] == 0 and s["stored_unacknowledged"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
