"""A TCP proxy that holds every reply from the server for a fixed delay (a slow provider).

Run as a process by ``bench_throughput.py --delay-ms``::

    python tests/benchmarks/delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS

Client to server bytes pass at once; server to client bytes are released
``DELAY_MS`` after they arrived, in order. Each SMTP reply (greeting, EHLO,
MAIL, RCPT, DATA, the final dot) therefore arrives that much later, as from a
provider far away, while the sending side still streams at full speed.
Prints ``ready`` on stdout once it listens.
"""

from __future__ import annotations

import asyncio
import sys


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, chunk = await pending.get()
            if not chunk:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        writer.close()

    releaser = asyncio.create_task(release())
    try:
        while chunk := await reader.read(65536):
            if delay:
                await pending.put((loop.time() + delay, chunk))
            else:
                writer.write(chunk)
                await writer.drain()
    except OSError:
        pass
    await pending.put((0.0, b""))
    await releaser


async def _main(listen_port: int, target_port: int, delay: float) -> None:
    async def session(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            _pump(client_r, server_w, 0.0),
            _pump(server_r, client_w, delay),
            return_exceptions=True,
        )

    server = await asyncio.start_server(session, "127.0.0.1", listen_port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000))
