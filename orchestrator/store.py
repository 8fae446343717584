"""The daemon's memory across restarts: switch history and the model last asked for.

One aiosqlite connection, WAL on disk, numbered migrations applied in order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from .history import Kind, Outcome, SwitchRecord

MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE switches (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        from_model TEXT,
        to_model TEXT,
        requested_at REAL NOT NULL,
        finished_at REAL,
        outcome TEXT NOT NULL,
        duration REAL,
        timings TEXT,
        error TEXT
    );
    CREATE INDEX switches_requested_at ON switches (requested_at);
    CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # The model registry: models added at run time, and what the user changed about
    # compose-declared ones (enabled, display name, capabilities).
    """
    CREATE TABLE models (
        id TEXT PRIMARY KEY,
        origin TEXT NOT NULL,
        entry TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # Warm swaps: whether a switch woke its model or started it.
    """
    ALTER TABLE switches ADD COLUMN path TEXT;
    """,
)


_COLUMNS = (
    "id, kind, from_model, to_model, requested_at, finished_at, outcome, duration, timings,"
    " error, path"
)


class Store:
    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._db = connection

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = await aiosqlite.connect(path)
        await connection.execute("PRAGMA busy_timeout = 5000")
        await connection.execute("PRAGMA journal_mode = WAL")
        store = cls(connection)
        await store._migrate()
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _migrate(self) -> None:
        async with self._db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self._db.executescript(script)
            # PRAGMA takes no bound parameters; number is our own integer.
            await self._db.execute(f"PRAGMA user_version = {int(number)}")
            await self._db.commit()

    async def save_switch(self, record: SwitchRecord) -> None:
        await self._db.execute(
            f"""
            INSERT INTO switches ({_COLUMNS})
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (id) DO UPDATE SET
                from_model = excluded.from_model, finished_at = excluded.finished_at,
                outcome = excluded.outcome, duration = excluded.duration,
                timings = excluded.timings, error = excluded.error, path = excluded.path
            """,
            (
                record.id,
                record.kind,
                record.from_model,
                record.to_model,
                record.requested_at,
                record.finished_at,
                record.outcome,
                record.duration,
                json.dumps(record.timings) if record.timings else None,
                json.dumps(record.error) if record.error is not None else None,
                record.path,
            ),
        )
        await self._db.commit()

    async def get_switch(self, switch_id: str) -> SwitchRecord | None:
        async with self._db.execute(
            f"SELECT {_COLUMNS} FROM switches WHERE id = ?", (switch_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return _record(row) if row else None

    async def recent_switches(self, limit: int = 20) -> list[SwitchRecord]:
        async with self._db.execute(
            f"SELECT {_COLUMNS} FROM switches ORDER BY requested_at DESC LIMIT ?", (limit,)
        ) as cursor:
            rows = await cursor.fetchall()
        return [_record(row) for row in rows]

    async def model_entries(self) -> list[dict[str, Any]]:
        """Every stored registry entry, oldest first, as the JSON it was saved as."""
        async with self._db.execute("SELECT entry FROM models ORDER BY created_at, id") as cursor:
            rows = await cursor.fetchall()
        return [dict(json.loads(row[0])) for row in rows]

    async def save_model_entry(
        self,
        model_id: str,
        origin: str,
        entry: dict[str, Any],
        created_at: float,
        updated_at: float,
    ) -> None:
        await self._db.execute(
            "INSERT INTO models (id, origin, entry, created_at, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET origin = excluded.origin, entry = excluded.entry,"
            " updated_at = excluded.updated_at",
            (model_id, origin, json.dumps(entry), created_at, updated_at),
        )
        await self._db.commit()

    async def delete_model_entry(self, model_id: str) -> None:
        await self._db.execute("DELETE FROM models WHERE id = ?", (model_id,))
        await self._db.commit()

    async def get_value(self, key: str) -> str | None:
        async with self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)) as cursor:
            row = await cursor.fetchone()
        return str(row[0]) if row else None

    async def set_value(self, key: str, value: str | None) -> None:
        if value is None:
            await self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
        else:
            await self._db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
        await self._db.commit()


def _record(row: Sequence[Any]) -> SwitchRecord:
    return SwitchRecord(
        id=row[0],
        kind=Kind(row[1]),
        from_model=row[2],
        to_model=row[3],
        requested_at=row[4],
        finished_at=row[5],
        outcome=Outcome(row[6]),
        duration=row[7],
        timings=json.loads(row[8]) if row[8] else None,
        error=json.loads(row[9]) if row[9] else None,
        path=row[10],
    )
