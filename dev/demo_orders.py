"""Mongo side of dev/demo: create the seed's purchase orders, print them, wait for a value.

Usage: demo_orders.py reset | show USER_ID | wait-email USER_ID EMAIL TIMEOUT_S | wait-synced TIMEOUT_S
Reads ECST_MONGO_URI; the database is `orders`, as in connector.toml.
"""
import json
import os
import sys
import time

from bson import json_util
from pymongo import MongoClient

db = MongoClient(os.environ.get("ECST_MONGO_URI", "mongodb://127.0.0.1:27117/"))["orders"]
orders = db["purchase_order"]

USERS = [
    (1, "Neha", "Parate", "neha.parate@gmail.com"),
    (2, "Aravind", "Dekate", "aravind.dekate@gmail.com"),
    (3, "Mayur", "Devghare", "mayur.devghare@gmail.com"),
    (4, "Suchita", "Vinchurkar", "suchita.vinchurkar@gmail.com"),
]
PRODUCTS = [(1, "IPad", 300.0), (2, "IPhone", 650.0), (3, "Sony TV", 320.0)]


def reset():
    orders.drop()
    docs = []
    for uid, first, last, email in USERS:
        for k in range(2):
            pid, desc, price = PRODUCTS[(uid + k) % len(PRODUCTS)]
            docs.append({
                "user": {"id": uid, "firstname": first, "lastname": last, "email": email},
                "product": {"productId": pid, "description": desc},
                "price": price,
                "_class": "com.example.demo.model.PurchaseOrder",
            })
    orders.insert_many(docs)
    print(f"inserted {len(docs)} purchase orders (2 per user)")


def show(uid):
    for d in orders.find({"user.id": uid}):
        print(json.dumps(json.loads(json_util.dumps(d)), indent=2))


def wait(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    sys.exit(f"timed out after {timeout}s waiting for {what}")


cmd = sys.argv[1]
if cmd == "reset":
    reset()
elif cmd == "show":
    show(int(sys.argv[2]))
elif cmd == "wait-email":
    uid, email, timeout = int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    wait(lambda: all(d["user"]["email"] == email for d in orders.find({"user.id": uid})), timeout, f"user {uid} email {email}")
elif cmd == "wait-synced":
    timeout = float(sys.argv[2])
    wait(lambda: orders.count_documents({}) > 0 and all("user_in_orders" in d.get("_ecst", {}) for d in orders.find({})), timeout, "ecst to sync every order")
else:
    sys.exit(__doc__)
