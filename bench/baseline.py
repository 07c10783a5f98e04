"""The bare baseline: uvloop + httptools, parses the request and its query, answers a fixed body.

The ceiling of the stack: what any server built on it pays before doing real work. The query is
decoded with urllib's parse_qsl, as a minimal real handler would. Run: python bench/baseline.py PORT
(PORT 0: the OS picks one; the port is printed on stdout).
"""
import asyncio
import sys
from urllib.parse import parse_qsl

import httptools
import uvloop

BODY = b"01a217a4-7e4b-7773-a97f-4e5514e16c82"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY


class Baseline(asyncio.Protocol):
    __slots__ = ("transport", "parser", "url")

    def connection_made(self, transport):
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url):
        self.url += url

    def on_message_complete(self):
        _, _, query = self.url.partition(b"?")
        parse_qsl(query.decode("latin-1"))
        self.url = b""
        self.transport.write(RESPONSE)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Baseline, "127.0.0.1", port, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
