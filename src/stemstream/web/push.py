"""``/ws``: the WebSocket that pushes the live state to a browser (what live.py builds)."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from stemstream.web.live import Client

router = APIRouter()


@router.websocket("/ws")
async def ws(websocket: WebSocket):
    if not websocket.app.state.access.may_read(websocket):
        await websocket.close(code=1008)
        return
    await websocket.accept()
    monitor = websocket.app.state.monitor
    client = Client()
    for text in monitor.greeting():
        client.offer(text)
    monitor.clients.add(client)

    async def drain() -> None:  # notices a browser that went away
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                await websocket.receive_text()

    reader = asyncio.create_task(drain())
    try:
        while not reader.done():
            getter = asyncio.create_task(client.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            await websocket.send_text(getter.result())
            client.sent += 1
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        pass
    finally:
        monitor.clients.discard(client)
        reader.cancel()
