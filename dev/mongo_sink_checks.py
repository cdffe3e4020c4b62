#!/usr/bin/env python3
"""The commands ecst's MongoDB sink (src/sink/mongo.rs, mapping.rs) sends, in their shapes, against
one server; prints what the server answers and where that differs from MongoDB. Exit 1 on a DIFF.

    .stack/venv/bin/python dev/mongo_sink_checks.py --uri mongodb://127.0.0.1:27118/

Written for the stack's mongo2 (mongo-java-server, which reports wire version 8: pymongo >= 4.18
refuses it, use `pip install 'pymongo<4.18'`). Works in a database of its own, dropped at the end.
"""

import argparse
import os
import sys
import uuid

from bson import Binary
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

DIFFS = []


def show(reply):
    if isinstance(reply, dict):
        reply = {k: v for k, v in reply.items() if k not in ("$clusterTime", "operationTime")}
    return repr(reply)


def check(name, same, reply, expect=""):
    print(f"{'ok  ' if same else 'DIFF'} {name}: {show(reply)}" + ("" if same else f"\n     MongoDB: {expect}"),
          flush=True)
    if not same:
        DIFFS.append(name)


def cmd(db, c):
    """Runs a command; returns the reply, or the error's details for a failed command."""
    try:
        return db.command(c)
    except OperationFailure as e:
        return {"error": True, **(e.details or {})}


def guard(v):
    return {"$or": [{"_ecst.m": {"$exists": False}}, {"_ecst.m": {"$lt": v}}]}


def run(uri):
    c = MongoClient(uri, serverSelectionTimeoutMS=5000, socketTimeoutMS=30000)
    name = f"ecst_sinkcheck_{os.getpid()}"
    db = c[name]

    info = c.admin.command("buildInfo")
    check("buildInfo without ferretdbVersion (the sink assumes MongoDB)", "ferretdbVersion" not in info,
          {k: info.get(k) for k in ("version", "versionArray", "ferretdbVersion") if k in info})
    # (drivers send the legacy isMaster and switch to hello only when the reply has helloOk: true)
    im = cmd(c.admin, {"isMaster": 1, "helloOk": True})
    print(f"info isMaster: {show(im)}")
    r = cmd(c.admin, {"hello": 1})
    print(f"info hello: {show(r) if r.get('error') else 'ok'}")

    # ensure_index: listIndexes of a missing collection is NamespaceNotFound (26), then createIndexes.
    r = cmd(db, {"listIndexes": "orders"})
    check("listIndexes on a missing collection: code 26", r.get("code") == 26, r,
          "error code 26 NamespaceNotFound")
    r = cmd(db, {"createIndexes": "orders", "indexes": [{"key": {"user.id": 1}, "name": "user.id_1"}]})
    keys = [list(ix["key"].keys()) for ix in db.orders.list_indexes()]
    check("createIndexes on user.id, listIndexes shows it", r.get("ok") == 1 and ["user.id"] in keys,
          {"reply": r, "keys": keys})

    # Embedded mapping: multi: true on the match path with the version guard, $set of the copy.
    db.orders.insert_many([
        {"_id": 1, "user": {"id": 3, "name": "old"}},                      # no version: updated
        {"_id": 2, "user": {"id": 3, "name": "old"}, "_ecst": {"m": "v1"}},  # older: updated
        {"_id": 3, "user": {"id": 3, "name": "new"}, "_ecst": {"m": "v3"}},  # newer: kept
        {"_id": 4, "user": {"id": 4, "name": "other"}},                     # other key: kept
    ])
    q = {"user.id": 3, **guard("v2")}
    r = cmd(db, {"update": "orders", "ordered": True, "updates": [
        {"q": q, "u": {"$set": {"user": {"id": 3, "name": "v2"}, "_ecst.m": "v2"}},
         "multi": True, "upsert": False}]})
    got = {d["_id"]: (d["user"]["name"], d.get("_ecst", {}).get("m")) for d in db.orders.find()}
    want = {1: ("v2", "v2"), 2: ("v2", "v2"), 3: ("new", "v3"), 4: ("other", None)}
    check("multi: true dotted filter + $or guard, $set user and _ecst.m",
          r.get("n") == 2 and r.get("nModified") == 2 and got == want, {"reply": r, "docs": got},
          f"n 2, nModified 2, docs {want}")
    # Dotted $set into the copy (delete policy mark), guarded.
    r = cmd(db, {"update": "orders", "ordered": True, "updates": [
        {"q": {"user.id": 3, **guard("v4")}, "u": {"$set": {"user.__deleted": True, "_ecst.m": "v4"}},
         "multi": True, "upsert": False}]})
    marked = sorted(d["_id"] for d in db.orders.find({"user.__deleted": True}))
    check("multi: true dotted $set user.__deleted", r.get("n") == 3 and marked == [1, 2, 3],
          {"reply": r, "marked": marked}, "n 3, marked [1, 2, 3]")

    # Document mapping: upsert by _id with the guard.
    ups = lambda i, v, extra=None: {"q": {"_id": i, **guard(v)},  # noqa: E731
                                    "u": {"$set": {"name": f"n{i}-{v}", "_ecst.m": v, **(extra or {})}},
                                    "multi": False, "upsert": True}
    r = cmd(db, {"update": "users", "ordered": True, "updates": [ups(10, "v2")]})
    doc = db.users.find_one({"_id": 10})
    check("guarded upsert of a new _id inserts {_id, $set fields} (the $or is not copied)",
          r.get("n") == 1 and r.get("upserted") == [{"index": 0, "_id": 10}]
          and doc == {"_id": 10, "name": "n10-v2", "_ecst": {"m": "v2"}}, {"reply": r, "doc": doc})
    r = cmd(db, {"update": "users", "ordered": True, "updates": [ups(10, "v3")]})
    check("guarded upsert of an older existing _id updates it",
          r.get("n") == 1 and r.get("nModified") == 1 and "upserted" not in r, r, "n 1, nModified 1")
    r = cmd(db, {"update": "users", "ordered": True, "updates": [ups(10, "v2")]})
    we = (r.get("writeErrors") or [{}])[0]
    check("guarded upsert of a newer existing _id: write error 11000 with keyPattern {_id: 1}",
          we.get("code") == 11000 and we.get("keyPattern") == {"_id": 1}, r,
          "writeErrors [{index 0, code 11000, keyPattern {_id: 1}, keyValue {_id: 10}, "
          "errmsg 'E11000 ... index: _id_ dup key: { _id: 10 }'}]")
    if we.get("code") == 11000 and "keyPattern" not in we:
        msg = we.get("errmsg", "")
        print(f"info  no keyPattern; the sink falls back to the errmsg, which "
              f"{'names' if ('index: _id_ ' in msg or '_id_ dup key' in msg) else 'does NOT name'} the _id_ index")

    # Ordered: MongoDB stops at the first write error (n counts what ran before it).
    r = cmd(db, {"update": "users", "ordered": True, "updates": [ups(11, "v2"), ups(10, "v1"), ups(12, "v2")]})
    ids = sorted(d["_id"] for d in db.users.find({"_id": {"$in": [11, 12]}}))
    errs = [e.get("index") for e in r.get("writeErrors", [])]
    check("ordered: true stops at the first write error", errs == [1] and ids == [11] and r.get("n") == 1,
          {"reply": r, "inserted": ids}, "n 1, writeErrors at [1], statement 2 not run: inserted [11]")
    r = cmd(db, {"update": "users", "ordered": False, "updates": [ups(13, "v2"), ups(10, "v1"), ups(14, "v2")]})
    ids = sorted(d["_id"] for d in db.users.find({"_id": {"$in": [13, 14]}}))
    check("ordered: false runs on after a write error", [e.get("index") for e in r.get("writeErrors", [])] == [1]
          and ids == [13, 14] and r.get("n") == 2, {"reply": r, "inserted": ids})
    # What the sink does after a reply with writeErrors at index i: it sends the statements after i
    # again. Where the server ran them already, a guarded upsert of the same version now fails.
    r = cmd(db, {"update": "users", "ordered": True, "updates": [ups(12, "v2")]})
    print(f"info  resending the already applied statement 2 of the ordered command: {show(r)}")

    # delete with limit: 1 and the guard (document mapping, delete policy unset).
    r = cmd(db, {"delete": "users", "ordered": True, "deletes": [
        {"q": {"_id": 10, **guard("v1")}, "limit": 1},   # newer document: kept
        {"q": {"_id": 11, **guard("v9")}, "limit": 1},   # older: deleted
        {"q": {"_id": 999, **guard("v9")}, "limit": 1}]})  # missing: nothing
    left = sorted(d["_id"] for d in db.users.find({"_id": {"$in": [10, 11]}}))
    check("delete, limit: 1, guarded", r.get("n") == 1 and left == [10], {"reply": r, "left": left},
          "n 1, left [10]")
    # A delete statement that fails: MongoDB reports writeErrors[index] and (ordered) stops.
    r = cmd(db, {"delete": "users", "ordered": True, "deletes": [
        {"q": {"_id": 12}, "limit": 1}, {"q": {"_id": {"$bogus": 1}}, "limit": 1},
        {"q": {"_id": 13}, "limit": 1}]})
    left = sorted(d["_id"] for d in db.users.find({"_id": {"$in": [12, 13]}}))
    check("delete with a bad statement: writeErrors at 1, ordered stop",
          [e.get("index") for e in r.get("writeErrors", [])] == [1] and left == [13] and r.get("n") == 1,
          {"reply": r, "left": left}, "ok 1, n 1, writeErrors at [1], left [13]")

    # writeConcern in a command (the sink copies the URI's).
    for wc in ({"w": 1}, {"w": "majority", "wtimeout": 5000}, {"w": 1, "j": True}, {"w": 2, "wtimeout": 100}):
        r = cmd(db, {"update": "users", "ordered": True, "writeConcern": wc,
                     "updates": [{"q": {"_id": 20}, "u": {"$set": {"x": 1}}, "multi": False, "upsert": True}]})
        if wc.get("w") != 2:
            check(f"writeConcern {wc}", r.get("ok") == 1 and "writeConcernError" not in r, r, "accepted")
        else:
            check(f"writeConcern {wc} on a standalone", bool(r.get("error") or "writeConcernError" in r), r,
                  "refused: w > 1 needs a replica set")

    # endSessions (drivers send it when they close), then dropDatabase.
    r = cmd(c.admin, {"endSessions": [{"id": Binary(uuid.uuid4().bytes, 4)}]})
    check("endSessions", r.get("ok") == 1, r, "ok 1")
    r = cmd(db, {"dropDatabase": 1})
    check("dropDatabase", r.get("ok") == 1 and name not in c.list_database_names(), r, "ok 1, database gone")
    c.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uri", default=os.environ.get("ECST_MONGO2_URI", "mongodb://127.0.0.1:27118/"))
    args = p.parse_args()
    try:
        run(args.uri)
    except PyMongoError as e:
        check("no unexpected error", False, f"{type(e).__name__}: {e}")
    print(f"DIFF from MongoDB: {', '.join(DIFFS)}" if DIFFS else "no difference from MongoDB found")
    sys.exit(1 if DIFFS else 0)


if __name__ == "__main__":
    main()
