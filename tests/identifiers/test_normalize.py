"""Normalization per platform, table-driven from the platforms' documented rules (platforms.md)."""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.identifiers.hashing import hash_once, is_sha256_hex, sha256_hex, sha256_hexes
from connector.identifiers.normalize import (
    ADDRESS_INCOMPLETE,
    COUNTRY_INVALID,
    DOB_INVALID,
    EMAIL_INVALID,
    MADID_INVALID,
    NO_IDENTIFIER,
    PHONE_INVALID,
    Normalizer,
    normalize_city,
    normalize_country,
    normalize_email,
    normalize_gender,
    normalize_madid,
    normalize_name,
    normalize_phone,
    normalize_state,
    normalize_zip,
)

ALL_FIELDS = ["email", "phone", "first_name", "last_name", "zip", "country", "city", "state", "gender",
              "date_of_birth", "external_id", "mobile_ad_id"]  # fmt: skip


def test_documented_meta_hash() -> None:
    assert sha256_hex("mary@example.com") == "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79"
    assert sha256_hexes(["mary@example.com", "é"]) == [sha256_hex("mary@example.com"), sha256_hex("é")]
    out = Normalizer("meta", ["email"]).normalize({"email": "  Mary@Example.COM "})
    assert out.payload == {"EMAIL": "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79"}


@pytest.mark.parametrize(
    ("raw", "google", "meta"),
    [
        ("Jane.Doe+news@Gmail.com", "janedoe@gmail.com", "jane.doe+news@gmail.com"),
        (" j.a.n.e@googlemail.com", "jane@googlemail.com", "j.a.n.e@googlemail.com"),
        ("jane.doe+news@example.com", "jane.doe+news@example.com", "jane.doe+news@example.com"),
        ("JANE@EXAMPLE.CO.UK", "jane@example.co.uk", "jane@example.co.uk"),
    ],
)
def test_email_rules(raw: str, google: str, meta: str) -> None:
    assert normalize_email(raw, "google") == google
    assert normalize_email(raw, "meta") == meta


@pytest.mark.parametrize("raw", ["not-an-email", "a@b", "a b@example.com", "@example.com", "x@@example.com", ""])
def test_bad_emails(raw: str) -> None:
    assert normalize_email(raw, "google") is None


@pytest.mark.parametrize(
    ("raw", "region", "e164"),
    [
        ("(415) 555-0134", "US", "+14155550134"),
        ("+1 415.555.0134", "DE", "+14155550134"),
        ("07911 123456", "GB", "+447911123456"),
        ("+44 7911 123456", "US", "+447911123456"),
        ("030 901820", "DE", "+4930901820"),
        ("0049 30 901820", "DE", "+4930901820"),  # 00: the international prefix in Germany
        ("011 49 30 901820", "US", "+4930901820"),  # 011: the international prefix in NANP
        ("011 49 30 901820", "CA", "+4930901820"),
        ("0044 20 7946 0958", "GB", "+442079460958"),
        ("001 650 253 0000", "GB", "+16502530000"),
        ("00 49 30 901820", "CH", "+4930901820"),
        ("+44 (0)20 7946 0958", "US", "+442079460958"),  # the trunk prefix after the country code is dropped
        ("+44 (0) 20 7946 0958", "DE", "+442079460958"),
        ("+44 07911 123456", "US", "+447911123456"),
        ("+1 650 253 0000", "GB", "+16502530000"),
        ("16502530000", "US", "+16502530000"),
        ("650/253-0000", "CA", "+16502530000"),
        ("+1 264 497 1234", "US", "+12644971234"),  # NANP outside the US (Anguilla): phonenumbers decides
        ("(800)555-0100", "US", "+18005550100"),  # Google's Data Manager example
        ("+44 844 412 4653", "US", "+448444124653"),  # Meta's customer list example
        ("01 45 67 89 10", "FR", "+33145678910"),
        ("098765 43210", "IN", "+919876543210"),
        ("(11) 91234-5678", "BR", "+5511912345678"),
    ],
)
def test_phones_several_regions(raw: str, region: str, e164: str) -> None:
    assert normalize_phone(raw, region) == e164
    g = Normalizer("google", ["phone"], region).normalize({"phone": raw}).payload["phone"]
    m = Normalizer("meta", ["phone"], region).normalize({"phone": raw}).payload["PHONE"]
    assert g == sha256_hex(e164)  # Google: E.164 with '+'
    assert m == sha256_hex(e164[1:])  # Meta: digits only, country code, no '+'


@pytest.mark.parametrize(
    "raw",
    [
        "n/a", "12", "+", "phone", "555", "+1 (000) 000",
        "0044 20 7946 0958",  # 00 is not the international prefix in the US (011 is)
        "0049 30 901820",
        "+1 650 253 00001",  # too many digits
        "+1 650 253 000",  # too few
        "+999 123 456 789",  # unassigned country code
        "+80 1234 5678",
        "(555) 234-5678",  # a plain NANP shape, but an unassigned area code
        "+1 555 987 6543",
        "+1 123 456 7890",
        "+44 20 7946 09581",  # too long for the UK
        "+49 30",  # too short for Germany
        "555-0134",
    ],
)  # fmt: skip
def test_bad_phones(raw: str) -> None:
    assert normalize_phone(raw, "US") is None
    out = Normalizer("google", ["phone", "email"]).normalize({"phone": raw, "email": "a@example.com"})
    assert out.errors == {"phone": PHONE_INVALID}
    assert "email" in out.payload  # the other identifier survives
    meta = Normalizer("meta", ["phone", "email"]).normalize({"phone": raw, "email": "a@example.com"})
    assert meta.errors == {"phone": PHONE_INVALID} and "PHONE" not in meta.payload


def _phonenumbers_e164(raw: str, region: str) -> str | None:
    """What phonenumbers alone says: E.164 of a valid number, None otherwise."""
    try:
        num = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164) if phonenumbers.is_valid_number(num) else None


def test_the_nanp_fast_path_is_active_and_agrees_with_phonenumbers_for_every_area_code() -> None:
    from connector.identifiers import normalize

    assert normalize._US_VALID is not None  # the fast path must not be silently off
    fast = 0
    for npa in range(200, 1000):
        for rest in ("2530000", "5550134", "2345678", "9876543", "1234567"):
            digits = f"{npa}{rest}"
            for raw, region in ((digits, "US"), (f"+1 {digits}", "GB"), (f"1-{npa}-{rest[:3]}-{rest[3:]}", "CA")):
                assert normalize_phone(raw, region) == _phonenumbers_e164(raw, region), (raw, region)
                fast += normalize._nanp_fast(normalize._PHONE_STRIP.sub("", raw), region) is not None
    assert fast > 3_000  # valid NANP numbers skip phonenumbers


nanp_shapes = st.builds(
    lambda pre, npa, nxx, line, seps, region: (
        f"{pre}{seps[0]}{npa}{seps[1]}{nxx}{seps[2]}{line:04d}", region),
    st.sampled_from(["", "1", "+1", "+1 ", "1-", "(1)", "001", "011 1"]),
    st.integers(0, 999).map(lambda n: f"{n:03d}"),
    st.integers(0, 999).map(lambda n: f"{n:03d}"),
    st.integers(0, 9999),
    st.lists(st.sampled_from(["", " ", "-", ".", "/", ") ", " (", "  "]), min_size=3, max_size=3),
    st.sampled_from(["US", "CA", "GB", "DE", "MX"]),
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(nanp_shapes)
def test_phones_agree_with_phonenumbers(shape: tuple[str, str]) -> None:
    # the fast path may only skip phonenumbers where it gives phonenumbers' own answer
    raw, region = shape
    assert normalize_phone(raw, region) == _phonenumbers_e164(raw.strip(), region), shape


def test_row_country_is_the_phone_region() -> None:
    out = Normalizer("meta", ["phone", "country"], "US").normalize({"phone": "07911 123456", "country": "GB"})
    assert out.payload["PHONE"] == sha256_hex("447911123456")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Mary ", "mary"), ("Dr. José", "josé"), ("O'Neil", "oneil"), ("Smith Jr.", "smith"), ("MRS ZOË", "zoë"),
        ("Ruiz-Ortega", "ruizortega"),  # punctuation removed, not turned into a space
        ("Mary-Jane", "maryjane"), ("D\u2019Angelo", "dangelo"), ("Smith-Jones", "smithjones"),
        ("Mrs. Jane", "jane"), ("Doe Jr.", "doe"), ("García III", "garcía"), ("Le Pen, PhD", "le pen"),
        ("  MARY  ANN ", "mary ann"), ("F.", "f"), ("Émilie", "émilie"), ("E\u0301milie", "émilie"),
        ("Saint-Exupéry Sr.", "saintexupéry"), ("Anne_Marie", "annemarie"), ("Jürg", "jürg"),
        ("Ms. Anne-Marie", "annemarie"), ("-", None), ("Dr.", None),
    ],
)  # fmt: skip
def test_names_keep_accents_drop_titles_and_punctuation(raw: str, expected: str | None) -> None:
    assert normalize_name(raw) == expected


@pytest.mark.parametrize(
    ("raw", "country", "meta", "google"),
    [
        ("SW1A 1AA", "GB", "sw1a1", "SW1A 1AA"),  # Meta: UK Area/District/Sector
        ("M1 1AE", "GB", "m11", "M1 1AE"),
        ("ec1a1bb", "GB", "ec1a1", "ec1a1bb"),
        ("SW1A 1AA", None, "sw1a1", "SW1A 1AA"),  # a full UK postcode without a country
        ("SW1A", "GB", "sw1a", "SW1A"),  # an outward code only: lower case, no spaces
        ("94107-1234", "US", "94107", "94107"),
        ("941071234", None, "94107", "94107"),
        ("1234", "US", None, None),
        ("WC2H 8LG", "SG", "wc2h8lg", "WC2H 8LG"),
        ("75001", "FR", "75001", "75001"),
        ("K1A 0B1", "CA", "k1a0b1", "K1A 0B1"),
    ],
)  # fmt: skip
def test_postal_codes(raw: str, country: str | None, meta: str | None, google: str | None) -> None:
    assert normalize_zip(raw, country, "meta") == meta
    assert normalize_zip(raw, country, "google") == google


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("San Francisco", "sanfrancisco"), ("Zürich", "zurich"), ("Saint-Étienne", "saintetienne"),
     ("São Paulo", "saopaulo"), ("New York", "newyork"), ("Straße", "strasse"), ("東京", None)],
)  # fmt: skip
def test_cities_are_letters_a_to_z(raw: str, expected: str | None) -> None:
    assert normalize_city(raw) == expected


def test_states() -> None:
    assert normalize_state("California", "US") == "ca" and normalize_state("NY", None) == "ny"
    assert normalize_state("Île-de-France", "FR") == "iledefrance" and normalize_state("Zürich", "CH") == "zurich"
    assert normalize_state("Atlantis", "US") is None


def test_meta_all_keys() -> None:
    n = Normalizer("meta", ALL_FIELDS, "US")
    raw = {"email": "Mary@Example.com", "phone": "(415) 555-0134", "first_name": "José", "last_name": "García",
           "zip": "94107-1234", "country": "United States", "city": "San Francisco", "state": "California",
           "gender": "Female", "date_of_birth": "1990-07-04", "external_id": "CRM-0042",
           "mobile_ad_id": "AB0C1D2E-1234-4ABC-8DEF-0123456789AB"}  # fmt: skip
    out = n.normalize(raw)
    assert out.errors == {}
    p = out.payload
    assert p["FN"] == sha256_hex("josé") and p["FI"] == sha256_hex("j") and p["LN"] == sha256_hex("garcía")
    assert p["ZIP"] == sha256_hex("94107") and p["COUNTRY"] == sha256_hex("us")
    assert p["CT"] == sha256_hex("sanfrancisco") and p["ST"] == sha256_hex("ca") and p["GEN"] == sha256_hex("f")
    assert (p["DOBY"], p["DOBM"], p["DOBD"]) == (sha256_hex("1990"), sha256_hex("07"), sha256_hex("04"))
    assert p["MADID"] == "ab0c1d2e-1234-4abc-8def-0123456789ab"  # lowercase, unhashed
    assert p["EXTERN_ID"] == "CRM-0042"  # exact, unhashed
    assert set(n.schema()) == set(p)


def test_meta_germany_is_de_not_ge() -> None:
    assert normalize_country("Germany") == "DE"
    out = Normalizer("meta", ["country", "email"]).normalize({"country": "Germany", "email": "a@b.de"})
    assert out.payload["COUNTRY"] == sha256_hex("de")


def test_google_address_needs_all_four_parts() -> None:
    n = Normalizer("google", ["email", "first_name", "last_name", "zip", "country"], "US")
    full = n.normalize({"email": "a@b.com", "first_name": "Mary", "last_name": "Smith", "zip": "10001-1234",
                        "country": "us"})  # fmt: skip
    assert full.payload["first_name"] == sha256_hex("mary")
    assert full.payload["country_code"] == "US" and full.payload["postal_code"] == "10001"  # unhashed
    part = n.normalize({"email": "a@b.com", "first_name": "Mary", "zip": "10001"})
    assert "first_name" not in part.payload and part.errors["address"] == ADDRESS_INCOMPLETE
    assert n.schema() == ("email", "first_name", "last_name", "country_code", "postal_code")


def test_google_ignores_fields_it_cannot_match() -> None:
    out = Normalizer("google", ["email", "gender", "city"]).normalize({"email": "a@b.com", "gender": "m", "city": "x"})
    assert set(out.payload) == {"email"}


def test_already_hashed_values_pass_through_once() -> None:
    h = sha256_hex("mary@example.com")
    for platform, key in (("meta", "EMAIL"), ("google", "email")):
        out = Normalizer(platform, ["email"]).normalize({"email": h.upper()})
        assert out.payload[key] == h
    assert hash_once(h) == h


def test_every_bad_value_has_its_reason_and_no_identifier_left() -> None:
    n = Normalizer("meta", ALL_FIELDS)
    out = n.normalize({"email": "nope", "country": "Atlantis", "date_of_birth": "31/31/1990", "mobile_ad_id": "xyz"})
    assert out.errors["email"] == EMAIL_INVALID and out.errors["country"] == COUNTRY_INVALID
    assert out.errors["date_of_birth"] == DOB_INVALID and out.errors["mobile_ad_id"] == MADID_INVALID
    assert out.payload == {} and out.errors["member"] == NO_IDENTIFIER


text = st.one_of(st.none(), st.text(max_size=80), st.sampled_from(["+1 415 555 0134", "a@b.co", "US", "1990-01-02"]))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["meta", "google"]), st.fixed_dictionaries({f: text for f in ALL_FIELDS}))
def test_never_raises_and_hashes_are_64_lower_hex(platform: str, raw: dict[str, str | None]) -> None:
    out = Normalizer(platform, ALL_FIELDS, "US").normalize(raw)
    plain = {"MADID", "EXTERN_ID", "country_code", "postal_code"}
    for k, v in out.payload.items():
        if k not in plain:
            assert len(v) == 64 and v == v.lower() and is_sha256_hex(v)


@settings(max_examples=200, deadline=None)
@given(st.emails())
def test_email_normalization_is_idempotent(email: str) -> None:
    for platform in ("meta", "google"):
        once = normalize_email(email, platform)  # type: ignore[arg-type]
        if once is not None:
            assert normalize_email(once, platform) == once  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_name_normalization_is_idempotent(name: str) -> None:
    once = normalize_name(name)
    if once is not None:
        assert normalize_name(once) == once


FIELD_RULES = {
    "email_meta": lambda v: normalize_email(v, "meta"),
    "email_google": lambda v: normalize_email(v, "google"),
    "phone_us": lambda v: normalize_phone(v, "US"),
    "phone_de": lambda v: normalize_phone(v, "DE"),
    "name": normalize_name,
    "country": normalize_country,
    "zip_us_google": lambda v: normalize_zip(v, "US", "google"),
    "zip_gb_meta": lambda v: normalize_zip(v, "GB", "meta"),
    "city": normalize_city,
    "state_us": lambda v: normalize_state(v, "US"),
    "gender": normalize_gender,
    "madid": normalize_madid,
}
unicode_text = st.one_of(
    st.text(max_size=60),  # anything: control characters, surrogates' neighbours, combining marks, emoji
    st.sampled_from(["+1 (415) 555-0134", "0049 30 1234567", "Mary.Smith+x@GMail.com", "SW1A 1AA", "  Zoë ", "ﬁ"]),
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(FIELD_RULES)), unicode_text)
def test_every_field_rule_never_raises_and_is_idempotent(rule: str, value: str) -> None:
    f = FIELD_RULES[rule]
    once = f(value)
    if once is not None:
        assert isinstance(once, str)
        assert f(once) == once, (rule, value, once)


@pytest.mark.parametrize("platform", ["meta", "google"])
def test_a_lone_surrogate_or_replacement_character_drops_that_identifier_only(platform: str) -> None:
    # JSON sources can carry a lone surrogate (handed on as U+FFFD): never an identifier, never an error
    norm = Normalizer(platform, ["email", "phone"], "US")
    for broken in ("a\ud800@example.com", "a\ufffd@example.com"):
        out = norm.normalize({"email": broken, "phone": "+1 415 555 0134"})
        assert out.errors == {"email": EMAIL_INVALID}
        assert out.payload == norm.normalize({"email": None, "phone": "+1 415 555 0134"}).payload

