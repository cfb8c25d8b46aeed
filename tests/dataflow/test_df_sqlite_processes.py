"""Several processes on one SQLite file (`nexus serve --workers N`): the one-writer rule
holds across processes, not only within one.

Each process runs read-modify-write `transaction()` blocks on one counter. DataFlow's
in-process gate cannot order them; `BEGIN IMMEDIATE` at the start of each block does
(SQLite's write lock, waited for up to the busy timeout): no update is lost and no
block fails with "database is locked".
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from dataflow import DataFlow

ROOT = Path(__file__).resolve().parents[2]
#: Increments per process: enough for two unordered processes to lose some (they lost
#: about one in eight before `BEGIN IMMEDIATE`).
INCREMENTS = 100

COUNTER = """
import asyncio, sys
from dataflow import DataFlow

async def main(url: str, n: int) -> None:
    db = DataFlow(url)

    @db.model
    class Counter:
        id: str
        value: int = 0

    ops = db.ops(Counter)
    for _ in range(n):
        async with db.transaction():
            row = await ops.read("c")
            await ops.update("c", fields={"value": row["value"] + 1})
    await db.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _declare(db: DataFlow) -> type:
    @db.model
    class Counter:
        id: str
        value: int = 0

    return Counter


async def test_transactions_of_two_processes_on_one_file_lose_no_update(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    db = DataFlow(url)
    counter = _declare(db)
    await db.initialize()
    await db.ops(counter).create(id="c")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", COUNTER, url, str(INCREMENTS), env=env, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    async with asyncio.timeout(120):
        results = [await p.communicate() for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()[-2000:]
    row = await db.ops(counter).read("c")
    await db.close()
    assert row["value"] == 2 * INCREMENTS
