"""The peer a user would otherwise write: the same durable ingest behind FastAPI on uvicorn.

Same validation, id rules, folds and synced LMDB commit as otserver (it calls otserver's model
and store), but one commit per request, run in FastAPI's thread pool, as a straightforward
FastAPI app would do it. Run: python bench/fastapi_peer.py DATA_DIR PORT (needs the bench extra:
pip install -e '.[bench]').
"""
import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from otserver.config import Config
from otserver.errors import BadRequest
from otserver.model import EidGenerator, make_event, now_ms, parse_properties
from otserver.store import Store

config = Config()
store = Store(sys.argv[1] if len(sys.argv) > 1 else "./otdata-fastapi")
eids = EidGenerator()
app = FastAPI()


@app.get("/", response_class=PlainTextResponse)
async def ingest(request: Request):
    try:
        props = parse_properties(request.url.query.encode(), config)
        event = make_event(props, {"user_agent": request.headers.get("user-agent", "")}, eids,
                           now_ms(), config)
    except BadRequest as exc:
        return PlainTextResponse(exc.reason, status_code=400)
    await run_in_threadpool(store.write_batch, [event])
    return PlainTextResponse(event.eid, headers={"Access-Control-Allow-Origin": "*",
                                                 "Cache-Control": "no-store"})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]) if len(sys.argv) > 2 else 0,
                log_level="info", access_log=False)
