"""Generate the bundled example segments (seeded, so the files are reproducible).

    python examples/generate.py

Writes examples/vip_buyers.csv, examples/shoe_fans.parquet and examples/shop.db (SQLite with a
`customers` table used by the at_risk segment). The data is synthetic: messy on purpose (mixed
case and spacing in emails, Gmail dots and +tags, phones in national and international formats,
a few broken values) so that normalization and the invalid-row report have something to show.
"""

from __future__ import annotations

import csv
import random
import sqlite3
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
    print(f"wrote {len(vip)} VIP buyers, {len(shoes)} shoe fans, {len(people)} customers in shop.db")


if __name__ == "__main__":
    main()
