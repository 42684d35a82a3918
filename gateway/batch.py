"""The durable batch queue behind the OpenAI Files and Batch APIs (SQLite in WAL mode).

Every accepted line is a row (batch id, line number) before the client hears "created", and every
result is written to that row before the item counts as done, so a gateway restart loses nothing:
rows left `running` by a dead gateway run again, and the output file is built from the rows
(one per line), so nothing is duplicated either. Work is released only into spare capacity
(the scheduler's `try_acquire`, which keeps a reserve for interactive traffic and yields while
interactive requests wait), earliest deadline first.

SQLite calls run on one worker thread: they are short, and the event loop never blocks on fsync.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from slofleet.gateway.errors import ApiError, invalid
from slofleet.gateway.validate import ROUTES, parse_request

log = logging.getLogger("slofleet.gateway.batch")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, content BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, input_file_id TEXT NOT NULL, endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL, metadata TEXT, status TEXT NOT NULL,
    created_at INTEGER NOT NULL, deadline REAL NOT NULL, priority INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, total INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, url TEXT NOT NULL,
    body TEXT NOT NULL, status TEXT NOT NULL, deadline REAL NOT NULL,
    status_code INTEGER, result TEXT, finished_at REAL,
    PRIMARY KEY (batch_id, line));
CREATE INDEX IF NOT EXISTS items_queue ON items (status, deadline, batch_id, line);
"""

_WINDOW = re.compile(r"^(\d+)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TERMINAL = ("completed", "failed", "cancelled", "expired")


def parse_window(window: str) -> float:
    m = _WINDOW.match(window.strip()) if isinstance(window, str) else None
    if not m or int(m.group(1)) <= 0:
        raise invalid(
            "completion_window", f"must look like '24h' (a positive number and s/m/h/d), got {window!r}"
        )
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def validate_batch_file(content: bytes, models: dict[str, int]) -> list[dict[str, Any]]:
    """Parse and check a batch input JSONL file; the first bad line is a 400 naming line and field."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid("file", f"must be UTF-8 JSONL ({exc})") from exc
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    # JSONL lines end at "\n" (or "\r\n") only: str.splitlines would also cut a line at a raw
    # U+2028, U+0085 or \x1c inside a JSON string, which is valid JSON and turns up in model text.
    for n, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        where = f"line {n}: "
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ApiError(
                400, f"{where}not valid JSON ({exc})", param=f"file.line[{n}]", code="invalid_jsonl"
            ) from exc
        if not isinstance(obj, dict):
            raise ApiError(
                400, f"{where}must be a JSON object", param=f"file.line[{n}]", code="invalid_jsonl"
            )
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise invalid(f"{where}custom_id", "is required and must be a non-empty string", "invalid_jsonl")
        if cid in seen:
            raise invalid(
                f"{where}custom_id", f"'{cid[:80]}' is used twice; custom_id must be unique", "invalid_jsonl"
            )
        seen.add(cid)
        if obj.get("method", "POST") != "POST":
            raise invalid(f"{where}method", "must be POST", "invalid_jsonl")
        url = obj.get("url")
        if url not in ROUTES:
            raise invalid(
                f"{where}url", f"must be one of {sorted(ROUTES)}, got {json.dumps(url)[:60]}", "invalid_jsonl"
            )
        body = obj.get("body")
        parsed = parse_request(ROUTES[url], body, models, prefix=f"{where}body.")
        if parsed.stream:
            raise invalid(f"{where}body.stream", "must be false in a batch", "invalid_jsonl")
        lines.append({"line": n, "custom_id": cid, "url": url, "body": body})
    if not lines:
        raise invalid("file", "has no request lines", "invalid_jsonl")
    return lines


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class BatchStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-sqlite")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._db.close()

    # --- files -------------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        fid = new_id("file-")
        now = int(time.time())
        self._db.execute(
            "INSERT INTO files (id, filename, purpose, bytes, created_at, content) VALUES (?,?,?,?,?,?)",
            (fid, filename, purpose, len(content), now, content),
        )
        return self.file_object(fid)

    def file_object(self, fid: str) -> dict[str, Any]:
        row = self._db.execute(
            "SELECT id, filename, purpose, bytes, created_at FROM files WHERE id=?", (fid,)
        ).fetchone()
        if row is None:
            raise ApiError(404, f"file_id: no file '{fid[:80]}'", param="file_id", code="not_found")
        return {"object": "file", "status": "processed", **dict(row)}

    def file_content(self, fid: str) -> bytes:
        row = self._db.execute("SELECT content FROM files WHERE id=?", (fid,)).fetchone()
        if row is None:
            raise ApiError(404, f"file_id: no file '{fid[:80]}'", param="file_id", code="not_found")
        return bytes(row["content"])

    def list_files(self, purpose: str | None) -> list[dict[str, Any]]:
        q = "SELECT id FROM files" + (" WHERE purpose=?" if purpose else "") + " ORDER BY created_at DESC, id"
        return [self.file_object(r["id"]) for r in self._db.execute(q, (purpose,) if purpose else ())]

    def delete_file(self, fid: str) -> dict[str, Any]:
        self.file_object(fid)
        self._db.execute("DELETE FROM files WHERE id=?", (fid,))
        return {"id": fid, "object": "file", "deleted": True}

    # --- batches -----------------------------------------------------------------------------
    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        window: str,
        window_s: float,
        metadata: dict[str, str] | None,
        priority: int,
        lines: list[dict[str, Any]],
    ) -> dict[str, Any]:
        bid = new_id("batch_")
        now = time.time()
        deadline = now + window_s
        with self._tx():
            self._db.execute(
                "INSERT INTO batches (id, input_file_id, endpoint, completion_window, metadata, status,"
                " created_at, deadline, priority, in_progress_at, total)"
                " VALUES (?,?,?,?,?, 'in_progress', ?,?,?,?,?)",
                (bid, input_file_id, endpoint, window, json.dumps(metadata), int(now), deadline, priority,
                 int(now), len(lines)),
            )  # fmt: skip
            self._db.executemany(
                "INSERT INTO items (batch_id, line, custom_id, url, body, status, deadline)"
                " VALUES (?,?,?,?,?, 'queued', ?)",
                [
                    (bid, ln["line"], ln["custom_id"], ln["url"], json.dumps(ln["body"]), deadline)
                    for ln in lines
                ],
            )
        return self.batch_object(bid)

    def _tx(self) -> Any:
        db = self._db

        class _Tx:
            def __enter__(self) -> None:
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type: Any, *_: Any) -> None:
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def batch_object(self, bid: str) -> dict[str, Any]:
        b = self._db.execute("SELECT * FROM batches WHERE id=?", (bid,)).fetchone()
        if b is None:
            raise ApiError(404, f"batch_id: no batch '{bid[:80]}'", param="batch_id", code="not_found")
        counts = dict.fromkeys(("done", "failed", "queued", "running", "cancelled"), 0)
        for row in self._db.execute(
            "SELECT status, COUNT(*) AS n FROM items WHERE batch_id=? GROUP BY status", (bid,)
        ):
            counts[row["status"]] = row["n"]
        return {
            "id": b["id"],
            "object": "batch",
            "endpoint": b["endpoint"],
            "errors": None,
            "input_file_id": b["input_file_id"],
            "completion_window": b["completion_window"],
            "status": b["status"],
            "output_file_id": b["output_file_id"],
            "error_file_id": b["error_file_id"],
            "created_at": b["created_at"],
            "in_progress_at": b["in_progress_at"],
            "expires_at": int(b["deadline"]),
            "finalizing_at": b["finalizing_at"],
            "completed_at": b["completed_at"],
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": b["cancelling_at"],
            "cancelled_at": b["cancelled_at"],
            "request_counts": {"total": b["total"], "completed": counts["done"], "failed": counts["failed"]},
            "metadata": json.loads(b["metadata"]) if b["metadata"] else None,
        }

    def list_batches(self, limit: int, after: str | None) -> list[dict[str, Any]]:
        if after:
            row = self._db.execute("SELECT created_at FROM batches WHERE id=?", (after,)).fetchone()
            if row is None:
                raise invalid("after", f"no batch '{after[:80]}'")
            rows = self._db.execute(
                "SELECT id FROM batches WHERE (created_at, id) < (?, ?)"
                " ORDER BY created_at DESC, id DESC LIMIT ?",
                (row["created_at"], after, limit),
            )
        else:
            rows = self._db.execute(
                "SELECT id FROM batches ORDER BY created_at DESC, id DESC LIMIT ?", (limit,)
            )
        return [self.batch_object(r["id"]) for r in rows.fetchall()]

    def cancel(self, bid: str) -> dict[str, Any]:
        b = self.batch_object(bid)
        if b["status"] in TERMINAL or b["status"] == "cancelling":
            return b
        with self._tx():
            self._db.execute(
                "UPDATE batches SET status='cancelling', cancelling_at=? WHERE id=?", (int(time.time()), bid)
            )
            self._db.execute(
                "UPDATE items SET status='cancelled' WHERE batch_id=? AND status='queued'", (bid,)
            )
        self.finalize_if_done(bid)
        return self.batch_object(bid)

    # --- the queue ---------------------------------------------------------------------------
    def recover(self) -> int:
        """After a restart: items a dead gateway had in flight run again; finish what finished."""
        n = self._db.execute("UPDATE items SET status='queued' WHERE status='running'").rowcount
        for row in self._db.execute(
            "SELECT id FROM batches WHERE status IN ('in_progress','cancelling','finalizing')"
        ).fetchall():
            self.finalize_if_done(row["id"])
        return n

    def next_items(self, limit: int) -> list[sqlite3.Row]:
        """Queued items, earliest deadline first (then batch and line order)."""
        return self._db.execute(
            "SELECT i.batch_id, i.line, i.custom_id, i.url, i.body, i.deadline, b.priority FROM items i"
            " JOIN batches b ON b.id = i.batch_id"
            " WHERE i.status='queued' ORDER BY i.deadline, i.batch_id, i.line LIMIT ?",
            (limit,),
        ).fetchall()

    def mark_running(self, bid: str, line: int) -> bool:
        return (
            self._db.execute(
                "UPDATE items SET status='running' WHERE batch_id=? AND line=? AND status='queued'",
                (bid, line),
            ).rowcount
            == 1
        )

    def requeue(self, bid: str, line: int) -> None:
        self._db.execute(
            "UPDATE items SET status='queued' WHERE batch_id=? AND line=? AND status='running'", (bid, line)
        )

    def record_result(self, bid: str, line: int, status_code: int, body: dict[str, Any]) -> None:
        self._db.execute(
            "UPDATE items SET status=?, status_code=?, result=?, finished_at=? WHERE batch_id=? AND line=?"
            " AND status='running'",
            (
                "done" if status_code == 200 else "failed",
                status_code,
                json.dumps(body),
                time.time(),
                bid,
                line,
            ),
        )
        self.finalize_if_done(bid)

    def finalize_if_done(self, bid: str) -> None:
        """Write output/error files once no item is queued or running (idempotent, one transaction)."""
        b = self._db.execute("SELECT status FROM batches WHERE id=?", (bid,)).fetchone()
        if b is None or b["status"] in TERMINAL:
            return
        left = self._db.execute(
            "SELECT COUNT(*) FROM items WHERE batch_id=? AND status IN ('queued','running')", (bid,)
        ).fetchone()[0]
        if left:
            return
        out: list[str] = []
        err: list[str] = []
        for r in self._db.execute(
            "SELECT line, custom_id, status, status_code, result FROM items WHERE batch_id=? ORDER BY line",
            (bid,),
        ):
            if r["status"] == "cancelled":
                continue
            body = json.loads(r["result"])
            record = {
                "id": f"batch_req_{bid.removeprefix('batch_')}_{r['line']}",
                "custom_id": r["custom_id"],
                "response": {"status_code": r["status_code"], "request_id": body.get("id"), "body": body},
                "error": None,
            }
            (out if r["status"] == "done" else err).append(json.dumps(record))
        now = int(time.time())
        final = "cancelled" if b["status"] == "cancelling" else "completed"
        with self._tx():
            out_id = self._insert_file(f"{bid}_output.jsonl", out, now) if out else None
            err_id = self._insert_file(f"{bid}_error.jsonl", err, now) if err else None
            self._db.execute(
                "UPDATE batches SET status=?, output_file_id=?, error_file_id=?, finalizing_at=?,"
                f" {'cancelled_at' if final == 'cancelled' else 'completed_at'}=? WHERE id=?",
                (final, out_id, err_id, now, now, bid),
            )
        log.info("batch_id=%s event=%s output=%d errors=%d", bid, final, len(out), len(err))

    def _insert_file(self, name: str, lines: list[str], now: int) -> str:
        fid = new_id("file-")
        content = ("\n".join(lines) + "\n").encode()
        self._db.execute(
            "INSERT INTO files (id, filename, purpose, bytes, created_at, content) VALUES (?,?,?,?,?,?)",
            (fid, name, "batch_output", len(content), now, content),
        )
        return fid

    def queue_stats(self) -> dict[str, Any]:
        row = self._db.execute(
            "SELECT COUNT(*) AS n, MIN(deadline) AS first FROM items WHERE status IN ('queued','running')"
        ).fetchone()
        queued = self._db.execute("SELECT COUNT(*) FROM items WHERE status='queued'").fetchone()[0]
        per_batch = [
            dict(r)
            for r in self._db.execute(
                "SELECT batch_id, COUNT(*) AS pending, MIN(deadline) AS deadline FROM items"
                " WHERE status IN ('queued','running') GROUP BY batch_id ORDER BY deadline"
            )
        ]
        return {
            "pending": row["n"],
            "queued": queued,
            "earliest_deadline": row["first"],
            "batches": per_batch,
        }
