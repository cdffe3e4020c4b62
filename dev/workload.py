#!/usr/bin/env python3
"""Seedable MySQL/MariaDB workload for ecst's benchmarks (dev/bench-compare; BENCHMARKS.md).

Every side of a comparison gets the same rows and the same statements: the values are a pure
function of the row id and the seed, and the order of the steady updates comes from a PRNG
seeded with the seed. The table has the shape of examples/bench.rs:

    users(id INT PK, firstname, lastname, email VARCHAR(45), n INT, created DATETIME(6),
          note VARCHAR(100))

Commands (connection from the ECST_MYSQL_* variables of `dev/stack env`, admin user):

    workload.py create DB [--table users]            database (utf8mb4) + table
    workload.py load DB ROWS [--seed S]              ROWS rows, 100,000 per INSERT ... SELECT
                                                     from MariaDB's SEQUENCE engine (seq_1_to_N)
    workload.py updates DB COUNT --rows ROWS         COUNT row updates at full speed, as
                                                     1,000-row UPDATEs (n = n + 1) cycling over ids
    workload.py steady DB --rate R --seconds S --rows ROWS [--seed S] [--out FILE]
                                                     single-row email updates at R/s, one per
                                                     autocommit transaction; writes one JSON line
                                                     per update: {"k", "id", "commit"} (commit =
                                                     wall-clock seconds when COMMIT returned);
                                                     --first-k continues the numbering of an
                                                     earlier call

The steady updates set email = 'u<id>.<k>@hotmail.com', k = 1, 2, ... so that a reader of the
target can tell which update of a row it sees (and that every earlier one was applied).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import pymysql

ROWS_PER_INSERT = 100_000
ROWS_PER_UPDATE = 1_000
EMOJI_NOTE = "note with emoji \U0001f600"


def connect(autocommit: bool = True) -> pymysql.connections.Connection:
    return pymysql.connect(
        host=os.environ.get("ECST_MYSQL_HOST", "127.0.0.1"),
        port=int(os.environ.get("ECST_MYSQL_PORT", "13306")),
        user=os.environ.get("ECST_MYSQL_ADMIN_USER", "ecst_admin"),
        password=os.environ.get("ECST_MYSQL_ADMIN_PASSWORD", "ecst_admin"),
        charset="utf8mb4",
        autocommit=autocommit,
    )


def q(name: str) -> str:
    """A quoted identifier (names here are generated, this only guards against typos)."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"bad identifier {name!r}")
    return f"`{name}`"


def create(db: str, table: str = "users") -> None:
    with connect() as c, c.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS {q(db)} CHARACTER SET utf8mb4")
        cur.execute(
            f"CREATE TABLE {q(db)}.{q(table)} (id INT PRIMARY KEY, firstname VARCHAR(45), "
            "lastname VARCHAR(45), email VARCHAR(45), n INT, created DATETIME(6), "
            "note VARCHAR(100))"
        )


def load(db: str, rows: int, seed: int = 1, table: str = "users") -> float:
    """Inserts rows 1..ROWS; returns the seconds it took. Values depend on (id, seed) only."""
    t0 = time.monotonic()
    done = 0
    with connect() as c, c.cursor() as cur:
        while done < rows:
            upto = min(done + ROWS_PER_INSERT, rows)
            cur.execute(
                f"INSERT INTO {q(db)}.{q(table)} SELECT seq, CONCAT('first', seq), "
                f"CONCAT('last', MOD(seq * 7919 + {seed}, 100003)), "
                "CONCAT('user', seq, '@gmail.com'), "
                f"MOD(seq * 31 + {seed}, 1000), "
                "TIMESTAMP('2024-01-01 00:00:00') + INTERVAL "
                f"MOD(seq * 104729 + {seed}, 31536000000000) MICROSECOND, "
                f"CONCAT(%s, ' ', {seed}) FROM {q(db)}.seq_{done + 1}_to_{upto}",
                (EMOJI_NOTE,),
            )
            done = upto
    return time.monotonic() - t0


def updates(db: str, count: int, rows: int, table: str = "users") -> float:
    """COUNT row updates as ROWS_PER_UPDATE-row UPDATEs cycling over 1..ROWS; returns seconds."""
    t0 = time.monotonic()
    written = 0
    lo = 1
    with connect() as c, c.cursor() as cur:
        while written < count:
            hi = min(lo + ROWS_PER_UPDATE - 1, rows, lo + (count - written) - 1)
            cur.execute(f"UPDATE {q(db)}.{q(table)} SET n = n + 1 WHERE id BETWEEN {lo} AND {hi}")
            written += hi - lo + 1
            lo = 1 if hi >= rows else hi + 1
    return time.monotonic() - t0


def steady_plan(rows: int, count: int, seed: int) -> list[int]:
    """The row id of each steady update k = 1..count (index k-1): seeded, identical per side."""
    rng = random.Random(seed)
    return [rng.randint(1, rows) for _ in range(count)]


def steady(db, rate, seconds, rows, seed=1, table="users", stop=None, on_commit=None, first_k=1):
    """Single-row updates at `rate`/s for `seconds` s; returns [(k, id, commit_wall_s)].

    k counts from `first_k`: successive calls on one table continue the numbering, so a value
    is never written twice.

    The schedule is absolute (update k is due at start + (k-1)/rate): a slow statement is
    caught up, not skipped. `stop` (a threading.Event) ends early; `on_commit(k, id, t)` is
    called after each commit.
    """
    count = int(rate * seconds)
    plan = steady_plan(rows, count, seed)
    out = []
    with connect() as c, c.cursor() as cur:
        t0 = time.monotonic()
        for i in range(count):
            k = first_k + i
            due = t0 + i / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if stop is not None and stop.is_set():
                break
            uid = plan[i]
            cur.execute(
                f"UPDATE {q(db)}.{q(table)} SET email = %s WHERE id = %s",
                (f"u{uid}.{k}@hotmail.com", uid),
            )
            t = time.time()
            out.append((k, uid, t))
            if on_commit is not None:
                on_commit(k, uid, t)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("create")
    a.add_argument("db")
    a.add_argument("--table", default="users")
    a = sub.add_parser("load")
    a.add_argument("db")
    a.add_argument("rows", type=int)
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--table", default="users")
    a = sub.add_parser("updates")
    a.add_argument("db")
    a.add_argument("count", type=int)
    a.add_argument("--rows", type=int, required=True)
    a.add_argument("--table", default="users")
    a = sub.add_parser("steady")
    a.add_argument("db")
    a.add_argument("--rate", type=float, required=True)
    a.add_argument("--seconds", type=float, required=True)
    a.add_argument("--rows", type=int, required=True)
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--table", default="users")
    a.add_argument("--first-k", type=int, default=1, help="number of the first update (default 1)")
    a.add_argument("--out", help="JSON lines file (default stdout)")
    args = p.parse_args(argv)

    if args.cmd == "create":
        create(args.db, args.table)
    elif args.cmd == "load":
        s = load(args.db, args.rows, args.seed, args.table)
        print(f"loaded {args.rows} rows in {s:.1f} s", file=sys.stderr)
    elif args.cmd == "updates":
        s = updates(args.db, args.count, args.rows, args.table)
        print(f"wrote {args.count} row updates in {s:.1f} s", file=sys.stderr)
    elif args.cmd == "steady":
        out = open(args.out, "w") if args.out else sys.stdout
        try:
            res = steady(
                args.db, args.rate, args.seconds, args.rows, args.seed, args.table,
                on_commit=lambda k, uid, t: print(json.dumps({"k": k, "id": uid, "commit": t}), file=out),
                first_k=args.first_k,
            )
        finally:
            if out is not sys.stdout:
                out.close()
        span = res[-1][2] - res[0][2] if len(res) > 1 else 0.0
        rate = (len(res) - 1) / span if span > 0 else 0.0
        print(f"{len(res)} updates, achieved {rate:.1f}/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
