"""A small reference normalizer written from the platforms' documentation, independently of
`connector.identifiers` (which it must never import): the answer key the golden, contract and chaos
suites compute expected audiences with. Sources: tests/identifiers/golden/README.md.

`normalize_member(platform, raw, default_region)` returns, for one member's raw values keyed by the
connector's identifier fields (email, phone, first_name, last_name, zip, country, city, state, gender,
date_of_birth, mobile_ad_id, external_id), each payload key the platform is sent with its normalized
string and how it is sent ("sha256": its SHA-256 hex; "as_is": the string itself). `payload(...)` is
what goes on the wire. Values that break a documented rule are left out (never sent). Pass only the
segment's mapped identifier fields (as the connector only normalizes those).

Where the documents leave a choice open, the choice is written next to the rule (and in the README).
"""

from __future__ import annotations

import datetime
import hashlib
import re
import unicodedata
from collections.abc import Mapping

import phonenumbers

SHA256 = "sha256"
AS_IS = "as_is"

GOOGLE_KEYS = ("email", "phone", "first_name", "last_name", "country_code", "postal_code")
META_KEYS = ("EMAIL", "PHONE", "FN", "FI", "LN", "ZIP", "CT", "ST", "COUNTRY", "GEN", "DOBY", "DOBM", "DOBD",
             "MADID", "EXTERN_ID")  # fmt: skip

# Google: "Don't include prefixes such as Mrs." / "suffixes such as Jr." (Data Manager formatting page);
# the Google Ads help lists Mr., Mrs., Dr. and Jr., Sr., III, PHD, MD among them.
PREFIXES = {"mr", "mrs", "ms", "miss", "mx", "dr", "prof"}
SUFFIXES = {"jr", "sr", "ii", "iii", "iv", "phd", "md"}
# what the golden members write instead of a two-letter code (not a full list: a reference, not a product)
COUNTRY_NAMES = {"united states": "US", "usa": "US", "united kingdom": "GB", "uk": "GB", "germany": "DE",
                 "france": "FR", "spain": "ES", "switzerland": "CH"}  # fmt: skip
US_STATES = {"california": "ca", "new york": "ny", "texas": "tx", "washington": "wa"}
GMAIL_DOMAINS = ("gmail.com", "googlemail.com")


def sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _prehashed(v: str) -> str | None:
    """A value given as a SHA-256 already (64 hex digits): sent as it is, in lower case."""
    v = v.strip().lower()
    return v if len(v) == 64 and all(c in "0123456789abcdef" for c in v) else None


# ----------------------------------------------------------------------------- email


def email(raw: str, platform: str) -> str | None:
    """Both: trim, lower case. Google only, for gmail.com / googlemail.com: no '.' in the local part and
    nothing from '+' on ("cloudy.sanfrancisco+shopping@gmail.com" -> "cloudysanfrancisco@gmail.com");
    other domains keep dots and '+' ("user.name+NYC@Example.com" -> "user.name+nyc@example.com")."""
    e = raw.strip().lower()
    if e.count("@") != 1 or any(c.isspace() for c in e):
        return None
    local, domain = e.split("@")
    labels = domain.split(".")
    if not local or len(labels) < 2 or not all(labels):
        return None
    if platform == "google" and domain in GMAIL_DOMAINS:
        local = local.split("+")[0].replace(".", "")
        if not local:
            return None
    return f"{local}@{domain}"


# ----------------------------------------------------------------------------- phone


def phone_e164(raw: str, region: str) -> str | None:
    """E.164 ('+', country code, national number without its trunk prefix), parsed by phonenumbers with
    the member's region (its country, else the segment's default) and dropped unless phonenumbers calls
    it a valid number. The international prefix is the region's own (00 in GB/DE, 011 in US/CA)."""
    try:
        num = phonenumbers.parse(raw.strip(), region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(num):
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


# ----------------------------------------------------------------------------- names and places


def name(raw: str) -> str | None:
    """Lower case, letters only (accents and other scripts kept: Meta "Special characters in UTF-8
    format", Google's template "zoë", "pérez"), punctuation removed rather than turned into a space
    ("Ruiz-Ortega" -> "ruizortega"), runs of spaces as one, one prefix and one suffix dropped."""
    s = unicodedata.normalize("NFC", raw).lower()
    kept = "".join(c if unicodedata.category(c)[0] in "LM" else (" " if c.isspace() else "") for c in s)
    words = kept.split()
    if words and words[0] in PREFIXES:
        words = words[1:]
    if len(words) > 1 and words[-1] in SUFFIXES:
        words = words[:-1]
    return " ".join(words) or None


def _ascii_letters(raw: str) -> str:
    """Meta's CT/ST rule, "a-z only ... no special characters, no white space": the Roman letters of the
    value (accents taken off: "Zürich" -> "zurich", as Meta asks for "the Roman alphabet translation")."""
    decomposed = unicodedata.normalize("NFKD", raw.lower())
    return "".join(c for c in decomposed if "a" <= c <= "z")


def country(raw: str) -> str | None:
    """ISO 3166-1 alpha-2, upper case here (Google sends it so, Meta hashes its lower case)."""
    v = raw.strip()
    if len(v) == 2 and v.isalpha() and v.upper() in phonenumbers.SUPPORTED_REGIONS:
        return v.upper()
    return COUNTRY_NAMES.get(v.lower())


_US_ZIP = re.compile(r"(\d{5})(?:-?\d{4})?")
_UK_POSTCODE = re.compile(r"([a-z]{1,2}\d[a-z\d]?)(\d)[a-z]{2}")  # spaces removed, lower case


def postal_code_google(raw: str, country_code: str) -> str | None:
    """Not hashed. US: the 5-digit ZIP (a ZIP+4 loses its extension). Elsewhere: as written, trimmed."""
    v = raw.strip()
    if country_code == "US":
        m = _US_ZIP.fullmatch(v)
        return m.group(1) if m else None
    return v or None


def zip_meta(raw: str, country_code: str | None) -> str | None:
    """Lower case, no white space; US: first 5 digits; UK: Area/District/Sector ("SW1A 1AA" -> "sw1a1").
    Without a country, a value shaped like a US ZIP or a full UK postcode is read as one."""
    z = "".join(raw.split()).lower()
    if country_code == "US" or (country_code is None and _US_ZIP.fullmatch(z)):
        m = _US_ZIP.fullmatch(z)
        return m.group(1) if m else None
    if country_code == "GB" or country_code is None:
        m = _UK_POSTCODE.fullmatch(z)
        if m:
            return m.group(1) + m.group(2)
    return z or None


def city(raw: str) -> str | None:
    return _ascii_letters(raw) or None


def state(raw: str, country_code: str | None) -> str | None:
    """US: the 2-letter ANSI code, lower case (a full state name becomes its code). Elsewhere: lower case
    a-z, no punctuation or white space."""
    v = raw.strip().lower()
    if country_code in ("US", None):
        if len(v) == 2 and v.isalpha():
            return v
        if v in US_STATES:
            return US_STATES[v]
        if country_code == "US":
            return None
    return _ascii_letters(v) or None


def gender(raw: str) -> str | None:
    return {"m": "m", "male": "m", "f": "f", "female": "f"}.get(raw.strip().lower())


def date_of_birth(raw: str, region: str) -> tuple[str, str, str] | None:
    """DOBY YYYY (1900 to the current year), DOBM MM, DOBD DD. ISO dates; dd/mm/yyyy, or mm/dd/yyyy in
    the US."""
    v = raw.strip()
    iso = re.fullmatch(r"(\d{4})-(\d{1,2})-(\d{1,2})", v)
    slash = re.fullmatch(r"(\d{1,2})/(\d{1,2})/(\d{4})", v)
    if iso:
        y, m, d = (int(x) for x in iso.groups())
    elif slash:
        a, b, y = (int(x) for x in slash.groups())
        m, d = (a, b) if region == "US" else (b, a)
    else:
        return None
    if not (1900 <= y <= datetime.date.today().year and 1 <= m <= 12 and 1 <= d <= 31):
        return None
    return f"{y:04d}", f"{m:02d}", f"{d:02d}"


def mobile_ad_id(raw: str) -> str | None:
    """IDFA / AAID: lower case, hyphens kept, not hashed."""
    v = raw.strip().lower()
    return v if re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", v) else None


# ----------------------------------------------------------------------------- members


Normalized = dict[str, tuple[str, str]]  # payload key -> (normalized string, SHA256 | AS_IS)


def _text(raw: Mapping[str, str | None], field: str) -> str:
    return (raw.get(field) or "").strip()


def normalize_member(platform: str, raw: Mapping[str, str | None], default_region: str = "US") -> Normalized:
    """Every payload key `platform` is sent for this member, with its normalized string and how it is sent."""
    if platform not in ("google", "meta"):
        raise ValueError(f"unknown platform {platform!r}")
    out: Normalized = {}
    row_country = country(_text(raw, "country")) if _text(raw, "country") else None
    region = row_country or default_region.upper()
    ekey, pkey = ("email", "phone") if platform == "google" else ("EMAIL", "PHONE")
    if e := _text(raw, "email"):
        if h := _prehashed(e):
            out[ekey] = (h, AS_IS)
        elif (ne := email(e, platform)) is not None:
            out[ekey] = (ne, SHA256)
    if p := _text(raw, "phone"):
        if h := _prehashed(p):
            out[pkey] = (h, AS_IS)
        elif (e164 := phone_e164(p, region)) is not None:
            out[pkey] = (e164 if platform == "google" else e164.lstrip("+"), SHA256)
    if platform == "google":
        _google_address(raw, row_country, default_region.upper(), out)
    else:
        _meta_rest(raw, row_country, region, out)
    return out


def _google_address(raw: Mapping[str, str | None], row_country: str | None, default_region: str, out: Normalized) -> None:
    """First name, last name (hashed), country code and postal code (not hashed): all four, or none."""
    # the address's country: the member's, else the segment's default (a country given but not
    # understood leaves the address without one)
    cc = row_country if _text(raw, "country") else default_region
    fn = name(_text(raw, "first_name")) if _text(raw, "first_name") else None
    ln = name(_text(raw, "last_name")) if _text(raw, "last_name") else None
    pc = postal_code_google(_text(raw, "zip"), cc) if _text(raw, "zip") and cc else None
    if fn and ln and cc and pc:
        out.update({"first_name": (fn, SHA256), "last_name": (ln, SHA256), "country_code": (cc, AS_IS),
                    "postal_code": (pc, AS_IS)})  # fmt: skip


def _meta_rest(raw: Mapping[str, str | None], row_country: str | None, region: str, out: Normalized) -> None:
    if v := _text(raw, "first_name"):
        if (fn := name(v)) is not None:
            out["FN"] = (fn, SHA256)
            out["FI"] = (fn[0], SHA256)
    if v := _text(raw, "last_name"):
        if (ln := name(v)) is not None:
            out["LN"] = (ln, SHA256)
    if v := _text(raw, "zip"):
        if (z := zip_meta(v, row_country)) is not None:
            out["ZIP"] = (z, SHA256)
    if v := _text(raw, "city"):
        if (ct := city(v)) is not None:
            out["CT"] = (ct, SHA256)
    if v := _text(raw, "state"):
        if (st := state(v, row_country)) is not None:
            out["ST"] = (st, SHA256)
    if row_country:
        out["COUNTRY"] = (row_country.lower(), SHA256)
    if v := _text(raw, "gender"):
        if (g := gender(v)) is not None:
            out["GEN"] = (g, SHA256)
    if v := _text(raw, "date_of_birth"):
        if (dob := date_of_birth(v, region)) is not None:
            out["DOBY"], out["DOBM"], out["DOBD"] = ((x, SHA256) for x in dob)
    if v := _text(raw, "mobile_ad_id"):
        if (mad := mobile_ad_id(v)) is not None:
            out["MADID"] = (mad, AS_IS)
    if v := _text(raw, "external_id"):
        out["EXTERN_ID"] = (v, AS_IS)


def payload(platform: str, raw: Mapping[str, str | None], default_region: str = "US") -> dict[str, str]:
    """What goes on the wire for this member: hashed where the platform hashes, as is elsewhere."""
    return {k: sha256_hex(v) if how == SHA256 else v for k, (v, how) in normalize_member(platform, raw, default_region).items()}
