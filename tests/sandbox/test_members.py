"""Member keys: identifiers packed into bytes and read back unchanged; one person is one key."""

from __future__ import annotations

import random

from connector.identifiers.hashing import sha256_hex
from connector.sandbox import members


def test_identifiers_come_back_as_they_went_in() -> None:
    rng = random.Random(7)
    for _ in range(500):
        ids = []
        for tag in sorted(rng.sample(range(16), rng.randint(1, 6))):
            if rng.random() < 0.6:
                ids.append((tag, sha256_hex(str(rng.random())), True))
            else:  # clear text of any length (a varint length past 127 bytes), any script, any character
                ids.append((tag, "".join(rng.choice("aZ09 +/%é€\x00\n") for _ in range(rng.choice([0, 1, 127, 128, 300]))),
                            False))  # fmt: skip
        key = members.pack(members.hashed(t, v) if h else members.text(t, v) for t, v, h in ids)
        assert members.unpack(key) == [(t, v) for t, v, _ in ids]


def test_a_hashed_identifier_is_its_tag_and_32_raw_bytes() -> None:
    email, phone = sha256_hex("a@x.com"), sha256_hex("+14155550100")
    key = members.pack([members.hashed(0, email), members.hashed(1, phone)])
    assert key == b"\x00" + bytes.fromhex(email) + b"\x01" + bytes.fromhex(phone) and len(key) == 66


def test_keys_tell_apart_what_differs_only_in_kind_or_place() -> None:
    h = sha256_hex("x")
    keys = {
        members.pack([members.hashed(0, h)]),  # the email
        members.pack([members.hashed(1, h)]),  # the same hash as the phone
        members.pack([members.text(0, h)]),  # the same text, not a hash
        members.pack([members.hashed(0, h), members.hashed(1, h)]),
        members.pack([members.text(0, "ab"), members.text(1, "")]),
        members.pack([members.text(0, "a"), members.text(1, "b")]),
    }
    assert len(keys) == 6


def test_a_google_member_is_one_key_whatever_the_order_of_its_identifiers() -> None:
    email, phone, first, last = (sha256_hex(s) for s in ("a@x.com", "+14155550100", "mary", "smith"))
    pieces = [members.google_piece("phone", phone), members.google_piece("country_code", "US"),
              members.google_piece("email", email), members.google_piece("postal_code", "94110"),
              members.google_piece("first_name", first), members.google_piece("last_name", last)]  # fmt: skip
    key = members.google_key(list(pieces))
    assert members.google_key(list(reversed(pieces))) == key
    assert members.google_pairs(key) == {("email", email), ("phone", phone), ("first_name", first), ("last_name", last),
                                         ("country_code", "US"), ("postal_code", "94110")}  # fmt: skip
    # two emails of one person are two identifiers of one member, not one
    twice = members.google_key([members.google_piece("email", email), members.google_piece("email", phone)])
    assert [tag for tag, _ in members.unpack(twice)] == [0, 0]
