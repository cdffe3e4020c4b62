#!/usr/bin/env python3
"""Smoke check of the stack's MongoDB stand-in (FerretDB) with pymongo; exits 1 on a failure.

    python3 -m venv .stack/venv && .stack/venv/bin/pip install pymongo
    .stack/venv/bin/python dev/mongo_smoke.py [--uri mongodb://127.0.0.1:27117/] [--bench]

It checks what the sink relies on, on a collection of --docs documents in a database of its own
(dropped at the end): buildInfo.ferretdbVersion, createIndexes, find with $in on _id, upserts
by _id, update_many with a dotted filter and a sub-document $set, loops of update_one, and
update commands of many statements, alone and from 3 clients at once. FerretDB 1.24 on
PostgreSQL hung for good on one command of 50 matching update_one statements while its pool had
50 connections (see FERRETDB_POOL in dev/stack); every request has a socket timeout here, so a
hang fails the check instead of blocking it. On SQLite, a command of 100 statements deadlocks,
and so do concurrent ones adding up to 100: use --max-statements 30 there.

--bench also prints timings: per-document writes by _id, dotted update_one and update_many.
Notes (not failures) report where FerretDB differs from MongoDB.
"""

import argparse
import os
import sys
import threading
import time

from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

FAILED = []


def check(name, cond, detail=""):
    print(f"{'ok  ' if cond else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not cond:
        FAILED.append(name)


def note(text):
    print(f"note {text}", flush=True)


def client(uri, timeout_s):
    ms = int(timeout_s * 1000)
    return MongoClient(uri, socketTimeoutMS=ms, serverSelectionTimeoutMS=10000, connectTimeoutMS=10000)


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def update_cmd(db, coll, n, first, value, multi=False):
    """One update command of n statements, each setting v on one existing document by _id."""
    stmts = [{"q": {"_id": first + i}, "u": {"$set": {"v": value}}, "multi": multi} for i in range(n)]
    return db.command({"update": coll, "updates": stmts, "ordered": True})


def run(args):
    c = client(args.uri, args.timeout)
    dbname = f"ecst_smoke_{os.getpid()}"
    db = c[dbname]
    coll = db.docs
    n = args.docs

    info = c.admin.command("buildInfo")
    check("buildInfo.ferretdbVersion", "ferretdbVersion" in info,
          f"version {info.get('version')}, ferretdbVersion {info.get('ferretdbVersion')!r}")

    _, dt = timed(lambda: coll.insert_many(
        [{"_id": i, "user": {"id": i % 1000, "name": f"u{i % 1000}"}, "v": 0} for i in range(n)]))
    check("insert_many", coll.count_documents({}) == n, f"{n} documents in {dt:.2f} s")

    r = db.command({"createIndexes": "docs", "indexes": [{"key": {"user.id": 1}, "name": "user_id"}]})
    names = [ix["name"] for ix in coll.list_indexes()]
    check("createIndexes", r.get("ok") == 1 and "user_id" in names, f"indexes {names}")

    want = {1, 17, n - 1}
    got = {d["_id"] for d in coll.find({"_id": {"$in": sorted(want) + [n + 12345]}})}
    check("find $in on _id", got == want, f"{sorted(got)}")

    # Upsert by _id: a new document, then the same one again.
    r1 = coll.update_one({"_id": n + 1}, {"$set": {"v": 7, "user": {"id": -1}}}, upsert=True)
    r2 = coll.update_one({"_id": n + 1}, {"$set": {"v": 8}}, upsert=True)
    check("upsert by _id", r1.upserted_id == n + 1 and r2.matched_count == 1 and r2.upserted_id is None
          and coll.find_one({"_id": n + 1})["v"] == 8)
    # The upserted[] of a command: statements 0 and 2 insert, statement 1 matches.
    r = db.command({"update": "docs", "updates": [
        {"q": {"_id": n + 2}, "u": {"$set": {"v": 1}}, "upsert": True},
        {"q": {"_id": 0}, "u": {"$set": {"v": 1}}, "upsert": True},
        {"q": {"_id": n + 3}, "u": {"$set": {"v": 1}}, "upsert": True}]})
    ups = [(u["index"], u["_id"]) for u in r.get("upserted", [])]
    check("upsert statements in one command", r["n"] == 3 and [i for _, i in ups] == [n + 2, n + 3],
          f"upserted {ups}")
    if [i for i, _ in ups] != [0, 2]:
        note(f"upserted[].index is {[i for i, _ in ups]}, MongoDB reports [0, 2]: match by _id, not by index")

    # update_many with a dotted filter and a sub-document $set; then find on the new dotted field.
    matching = coll.count_documents({"user.id": 3})
    r, dt = timed(lambda: coll.update_many(
        {"user.id": 3}, {"$set": {"user": {"id": 3, "name": "three", "tier": "gold"}}}))
    found = coll.count_documents({"user.tier": "gold"})
    check("update_many dotted filter, $set sub-document", matching > 0 and r.matched_count == matching
          and r.modified_count == matching and found == matching,
          f"matched {r.matched_count} of {matching}, found {found}, {dt * 1000:.0f} ms")

    # A loop of single update_one calls (reported once to hang after 50).
    _, dt = timed(lambda: [coll.update_one({"_id": i}, {"$set": {"v": 2}}) for i in range(100)])
    check("100 update_one calls", coll.count_documents({"v": 2}) == 100, f"{dt:.2f} s")

    # One command of many update_one statements, then 3 clients at once.
    sizes = [k for k in (30, 49, 50, 100, 200) if k <= args.max_statements]
    for k in sizes:
        try:
            r, dt = timed(lambda: update_cmd(db, "docs", k, 0, 100 + k))
            check(f"update command of {k} statements", r["n"] == k and r["nModified"] == k, f"{dt:.2f} s")
        except PyMongoError as e:
            check(f"update command of {k} statements", False, f"{type(e).__name__}: {e}")
            return
    for k in [k for k in (30, 50, 100, 200) if k <= args.max_statements]:
        res = {}

        def worker(w):
            cw = client(args.uri, args.timeout)
            try:
                r = update_cmd(cw[dbname], "docs", k, w * k, 1000 + k)
                res[w] = r["n"]
            except PyMongoError as e:
                res[w] = f"{type(e).__name__}: {e}"
            finally:
                cw.close()

        ths = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
        t = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        check(f"3 clients, update command of {k} statements each", res == {0: k, 1: k, 2: k},
              f"{res}, {time.perf_counter() - t:.2f} s")

    # Where FerretDB differs from MongoDB (notes only).
    try:
        db.command({"update": "docs", "updates": [{"q": {"_id": n + 1}, "u": {"$set": {"a.$[x]": 1}},
                                                    "arrayFilters": [{"x": 1}]}]})
    except OperationFailure as e:
        note(f"arrayFilters refused: {str(e.details.get('errmsg', e))[:60]}...")
    # A write error: MongoDB applies statement 0, reports index 1 and n 1, and (ordered) stops.
    r = db.command({"update": "docs", "ordered": True, "updates": [
        {"q": {"_id": 1}, "u": {"$set": {"v": -3}}},
        {"q": {"_id": 2}, "u": {"$inc": {"v": "x"}}},  # $inc of a string: a write error
        {"q": {"_id": 3}, "u": {"$set": {"v": -3}}}]})
    errs = [e["index"] for e in r.get("writeErrors", [])]
    applied = [d["_id"] for d in coll.find({"v": -3})]
    check("ordered update stops at the first write error", len(errs) == 1 and applied == [1],
          f"applied {applied}, writeErrors at {errs}, n {r.get('n')}")
    if errs != [1] or r.get("n") != 1:
        note(f"a failed update statement is reported at index {errs} with n {r.get('n')} "
             "(MongoDB: index 1, n 1); FerretDB ends the command there even when unordered")
    if args.bench:
        bench(db, coll, n)

    c.drop_database(dbname)
    check("dropDatabase", dbname not in c.list_database_names())


def bench(db, coll, n):
    k = 300
    _, dt = timed(lambda: [coll.update_one({"_id": (i * 7919) % n}, {"$set": {"v": i}}) for i in range(k)])
    print(f"bench update_one by _id, {n} docs: {dt / k * 1000:.2f} ms per document ({k} calls)")
    _, dt = timed(lambda: [update_cmd(db, "docs", 50, j * 50, j) for j in range(6)])
    print(f"bench update command of 50 _id statements, {n} docs: {dt / 300 * 1000:.2f} ms per statement")
    _, dt = timed(lambda: [update_cmd(db, "docs", 50, j * 50, j, multi=True) for j in range(6)])
    print(f"bench same with multi: true, {n} docs: {dt / 300 * 1000:.2f} ms per statement")
    k = 200
    _, dt = timed(lambda: [coll.update_one({"user.id": i % 1000}, {"$set": {"w": i}}) for i in range(k)])
    print(f"bench dotted update_one, {n} docs: {dt:.2f} s for {k} ({dt / k * 1000:.1f} ms each)")
    k = 50
    _, dt = timed(lambda: [coll.update_many({"user.id": i}, {"$set": {"user.seen": i}}) for i in range(k)])
    print(f"bench dotted update_many ({n // 1000} documents each), {n} docs: "
          f"{dt / k * 1000:.1f} ms each ({k} calls)")
    k = 200
    _, dt = timed(lambda: [list(coll.find({"user.id": i})) for i in range(k)])
    print(f"bench dotted find, {n} docs: {dt / k * 1000:.1f} ms each ({k} calls)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uri", default=os.environ.get("ECST_MONGO_URI", "mongodb://127.0.0.1:27117/"))
    p.add_argument("--docs", type=int, default=5000)
    p.add_argument("--max-statements", type=int, default=200,
                   help="largest update command tried (use 30 on SQLite, see above)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout per request, seconds")
    p.add_argument("--bench", action="store_true", help="also print timings")
    args = p.parse_args()
    if args.docs < 3 * args.max_statements:
        p.error("--docs must be at least 3 x --max-statements (each client updates its own documents)")
    try:
        run(args)
    except PyMongoError as e:
        check("no unexpected error", False, f"{type(e).__name__}: {e}")
    print(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all checks passed'}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
