"""The message-ack load, in a process of its own so the measuring client's own pauses (GC of the
harness's large report lists) do not count against the agent: N senders post messages concurrently
and the latencies are printed as JSON."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from typing import Any

import aiohttp


async def run(
    url: str, secret: str, messages: list[dict[str, Any]], senders: int, per_sender: int
) -> list[float]:
    latencies: list[float] = []
    async with aiohttp.ClientSession(
        headers={"Cluster-Authorization": secret}, connector=aiohttp.TCPConnector(limit=0)
    ) as session:

        async def sender(n: int) -> None:
            for k in range(per_sender):
                msg = messages[(n * per_sender + k) % len(messages)]
                body = json.dumps(msg).encode()
                t = time.perf_counter()
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(sender(n) for n in range(senders)))
    return latencies


def main() -> int:
    spec = json.load(sys.stdin)
    gc.freeze()
    latencies = asyncio.run(
        run(spec["url"], spec["secret"], spec["messages"], spec["senders"], spec["per_sender"])
    )
    json.dump(latencies, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
