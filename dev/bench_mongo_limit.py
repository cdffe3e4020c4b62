#!/usr/bin/env python3
"""The MongoDB server's own limit for the sink's embedded fan-out, measured with a bare client.

Same shape as `dev/bench`'s sink phase: ORDERS purchase orders embed ORDERS/2 users (two orders
per user, index on user.id); each change is the statement the sink sends, a guarded
`updateMany` of one user's copies ({user.id: k, $or: [version missing, version < v]} with a
$set of the copy and the version), sent in `update` commands of STATEMENTS statements, one
command at a time, as fast as the server takes them. Prints changes/s (and documents/s).

    .stack/py/bin/python dev/bench_mongo_limit.py [--uri URI] [--orders 5000] [--changes 3000]
        [--statements 25]
"""
import argparse
import sys
import time

from pymongo import MongoClient


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uri", default="mongodb://127.0.0.1:27117/")
    ap.add_argument("--orders", type=int, default=5000)
    ap.add_argument("--changes", type=int, default=3000)
    ap.add_argument("--statements", type=int, default=25)
    a = ap.parse_args()
    client = MongoClient(a.uri, serverSelectionTimeoutMS=5000, socketTimeoutMS=60000)
    db = client[f"bench_limit_{int(time.time())}"]
    orders = db["purchase_order"]
    users = a.orders // 2
    orders.insert_many(
        [
            {
                "user": {"id": i % users + 1, "firstname": "F", "lastname": "L", "email": "e@x"},
                "product": {"productId": i % 3 + 1, "description": "IPad"},
                "price": 300.0,
            }
            for i in range(a.orders)
        ]
    )
    orders.create_index("user.id")
    started = time.monotonic()
    sent = 0
    matched = 0
    while sent < a.changes:
        stmts = []
        for j in range(min(a.statements, a.changes - sent)):
            k = (sent + j) % users + 1
            version = f"e9999999999.0000000001.{sent + j:015d}.000000000"
            stmts.append(
                {
                    "q": {
                        "user.id": k,
                        "$or": [
                            {"_ecst.u": {"$exists": False}},
                            {"_ecst.u": {"$lt": version}},
                        ],
                    },
                    "u": {
                        "$set": {
                            "user": {"id": k, "firstname": "F", "lastname": "L", "email": f"{sent + j}@x"},
                            "_ecst.u": version,
                        }
                    },
                    "multi": True,
                    "upsert": False,
                }
            )
        reply = db.command({"update": "purchase_order", "updates": stmts, "ordered": True})
        if reply.get("writeErrors"):
            print(f"write errors: {reply['writeErrors'][:1]}", file=sys.stderr)
            return 1
        matched += reply.get("n", 0)
        sent += len(stmts)
    secs = time.monotonic() - started
    client.drop_database(db.name)
    print(
        f"bare client, {a.statements} statements per command, {a.orders} orders: "
        f"{a.changes} changes in {secs:.2f} s = {a.changes / secs:.0f} changes/s "
        f"({matched / secs:.0f} documents/s, {matched} matched)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
