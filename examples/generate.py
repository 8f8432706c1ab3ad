"""Generate the bundled example segments (seeded, so the files are reproducible).

    python examples/generate.py

Writes examples/vip_buyers.csv, examples/shoe_fans.parquet, examples/shop.db (SQLite with a
`customers` table used by the at_risk segment and the `customers` named source) and examples/orders.csv
(two years of orders of those customers, for the predicted-value tiers; drawn the way the BG/NBD and
Gamma-Gamma models assume: each customer buys at their own rate until they drop out, each order's value
around their own mean; a few rows are broken on purpose). The data is synthetic: messy on purpose (mixed
case and spacing in emails, Gmail dots and +tags, phones in national and international formats,
a few broken values) so that normalization and the invalid-row report have something to show.
"""

from __future__ import annotations

import csv
import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
SEED = 20261122

FIRST = ["Mary", "José", "Anna", "Liam", "Noah", "Emma", "Olivia", "Lucas", "Mia", "Zoë", "Hans", "Chloé",
         "Ethan", "Sofia", "Mateo", "Léa", "Jack", "Amelia", "Oscar", "Isla"]
LAST = ["Smith", "García", "Müller", "Johnson", "Brown", "O'Neil", "Dubois", "Rossi", "Nowak", "Silva",
        "Taylor", "Martin", "Lee", "Walker", "Young", "King", "Wright", "Lopez", "Hill", "Scott"]
DOMAINS = ["gmail.com", "example.com", "shop-mail.com", "googlemail.com", "yahoo.com", "outlook.com"]
REGIONS = [("US", "+1", "{npa}-{d}{e}{f}-{g}{h}{i}{j}"), ("GB", "+44", "07{a}{b}{c} {d}{e}{f}{g}{h}{i}"),
           ("DE", "+49", "0151 {a}{b}{c}{d}{e}{f}{g}{h}")]
US_AREA_CODES = ["212", "312", "415", "512", "617", "646", "702", "713", "206", "305"]
ZIPS = {"US": ["94107", "10001-1234", "60614", "73301"], "GB": ["SW1A 1AA", "EC1A 1BB"], "DE": ["10115", "80331"]}


def person(rng: random.Random, i: int) -> dict[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    domain = rng.choice(DOMAINS)
    local = f"{first}.{last}{i}".lower().replace("'", "")
    if domain in ("gmail.com", "googlemail.com") and rng.random() < 0.3:
        local += "+shop"
    email = f"{local}@{domain}"
    if rng.random() < 0.3:
        email = f"  {email.upper()} "
    country, cc, fmt = rng.choice(REGIONS)
    digits = {k: str(rng.randint(2 if k in "ad" else 0, 9)) for k in "abcdefghij"}
    digits["npa"] = rng.choice(US_AREA_CODES)  # assigned area codes: phonenumbers drops numbers in others
    phone = fmt.format(**digits)
    if rng.random() < 0.3:
        phone = cc + " " + phone.lstrip("0")
    if rng.random() < 0.03:
        phone = "n/a"
    if rng.random() < 0.02:
        email = "not-an-email"
    return {
        "customer_id": f"C{100000 + i}",
        "email": email,
        "phone": phone,
        "first_name": first if rng.random() > 0.1 else f"Dr. {first}",
        "last_name": last,
        "zip": rng.choice(ZIPS[country]),
        "country": country,
        "consent_ads": "granted" if rng.random() > 0.05 else "denied",
        "lifetime_value": f"{rng.uniform(50, 5000):.2f}",
    }


ORDERS_END = datetime(2026, 10, 31, 23, 0, tzinfo=UTC)  # the last day of the example's order history
ORDER_DAYS = 730


def orders(rng: random.Random, customers: list[str]) -> list[dict[str, str]]:
    """Nine customers in ten: a first order in the two years, then orders at a personal rate (Gamma) with a chance
    of dropping out after each (Beta), each worth around a personal mean (Gamma-Gamma)."""
    start = ORDERS_END - timedelta(days=ORDER_DAYS)
    rows: list[tuple[datetime, str, float]] = []
    for cid in customers:
        if rng.random() < 0.1:
            continue  # signed up, never ordered: no predicted value, so in the last tier
        rate = rng.gammavariate(0.9, 1 / 25)  # orders a day while active: one every ~4 weeks on average
        dropout = rng.betavariate(1.2, 4.0)
        mean_value = rng.gammavariate(4.0, 1 / 4.0) * rng.choice([35, 60, 90, 160])
        t = rng.uniform(0, ORDER_DAYS)
        while t <= ORDER_DAYS:
            rows.append((start + timedelta(days=t), cid, round(max(2.0, rng.gammavariate(6.0, mean_value / 6.0)), 2)))
            if rng.random() < dropout:
                break
            t += rng.expovariate(rate)
    rows.sort()
    out = [{"order_id": f"O{100000 + i}", "customer_id": cid, "ordered_at": when.strftime("%Y-%m-%dT%H:%M:%S"),
            "amount": f"{amount:.2f}"} for i, (when, cid, amount) in enumerate(rows)]  # fmt: skip
    # what real exports hold too: a refund, a missing amount, an unreadable time (skipped and counted)
    out[5]["amount"] = "-" + out[5]["amount"]
    out[17]["amount"] = ""
    out[29]["ordered_at"] = "yesterday"
    return out


def main() -> None:
    rng = random.Random(SEED)
    people = [person(rng, i) for i in range(1, 1201)]
    vip = [p for p in people if float(p["lifetime_value"]) > 1500][:400]
    with (HERE / "vip_buyers.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(vip[0]))
        w.writeheader()
        w.writerows(vip)
    shoes = rng.sample(people, 300)
    table = pa.table({k: [p[k] for p in shoes] for k in ("customer_id", "email", "phone", "country")})
    pq.write_table(table, HERE / "shoe_fans.parquet")
    db = HERE / "shop.db"
    db.unlink(missing_ok=True)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE customers (customer_id TEXT PRIMARY KEY, email TEXT, phone TEXT, first_name TEXT,"
                " last_name TEXT, zip TEXT, country TEXT, orders INTEGER, days_since_order INTEGER)")
    con.executemany(
        "INSERT INTO customers VALUES (?,?,?,?,?,?,?,?,?)",
        [(p["customer_id"], p["email"], p["phone"], p["first_name"], p["last_name"], p["zip"], p["country"],
          rng.choice([1, 1, 1, 2, 3, 5]), rng.randint(1, 400)) for p in people],
    )
    con.commit()
    con.close()
    # a generator of its own: the files above stay as they were
    history = orders(random.Random(SEED + 1), [p["customer_id"] for p in people])
    with (HERE / "orders.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    print(f"wrote {len(vip)} VIP buyers, {len(shoes)} shoe fans, {len(people)} customers in shop.db, "
          f"{len(history)} orders")


if __name__ == "__main__":
    main()
