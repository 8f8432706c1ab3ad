"""Per-platform identifier normalization, following each platform's published rules.

`Normalizer(platform, fields, default_region).normalize(raw)` turns one member's raw values
(keyed by identifier field) into the payload sent to that platform: hashed where the platform
hashes, plain where it wants plain text. A bad value drops that identifier and records a reason
code; it never raises and never fails a batch.

Google (Customer Match): email trimmed and lowercased, and for gmail.com/googlemail.com only,
dots removed from the local part and ``+suffix`` dropped; phone E.164 with ``+``; first and last
name lowercased without titles, suffixes or punctuation; country code (ISO alpha-2, upper case)
and postal code unhashed; an address is sent only with all four parts.

Meta (Custom Audiences): EMAIL trimmed and lowercased; PHONE digits only with country code;
FN/LN lowercased without punctuation, accented letters kept; FI first initial; ZIP lowercase
without spaces (US: 5 digits, UK: Area/District/Sector); CT letters a-z only; ST US two-letter code,
elsewhere letters a-z only; COUNTRY alpha-2 lowercase; GEN m/f; DOBY/DOBM/DOBD; MADID lowercase
unhashed; EXTERN_ID exactly as given, unhashed.

Phones (both): parsed and validated by `phonenumbers` with the row's country or the segment's default
region; only plain, valid NANP shapes skip it. Invalid numbers are dropped, never sent.

The golden answer keys in tests/identifiers/golden/ (typed in from the platforms' pages) say what each
rule must produce.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import phonenumbers

from connector.identifiers.hashing import hash_once, is_sha256_hex

EMAIL_INVALID = "email_invalid"
PHONE_INVALID = "phone_invalid"
ADDRESS_INCOMPLETE = "address_incomplete"
NAME_INVALID = "name_invalid"
ZIP_INVALID = "zip_invalid"
COUNTRY_INVALID = "country_invalid"
CITY_INVALID = "city_invalid"
STATE_INVALID = "state_invalid"
GENDER_INVALID = "gender_invalid"
DOB_INVALID = "dob_invalid"
MADID_INVALID = "madid_invalid"
EXTERN_ID_INVALID = "extern_id_invalid"
NO_IDENTIFIER = "no_identifier"

# the reason a value of each identifier field is dropped for
FIELD_REASONS = {
    "email": EMAIL_INVALID, "phone": PHONE_INVALID, "first_name": NAME_INVALID, "last_name": NAME_INVALID,
    "zip": ZIP_INVALID, "country": COUNTRY_INVALID, "city": CITY_INVALID, "state": STATE_INVALID,
    "gender": GENDER_INVALID, "date_of_birth": DOB_INVALID, "mobile_ad_id": MADID_INVALID,
    "external_id": EXTERN_ID_INVALID,
}  # fmt: skip
_LONE_SURROGATE = re.compile("[\ud800-\udfff\ufffd]")  # sources hand a lone surrogate on as U+FFFD

PlatformName = Literal["meta", "google"]

_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
_PHONE_STRIP = re.compile(r"[\s\-.()/]")
# plain NANP shapes: "+1" and ten digits anywhere; in a US or CA segment also ten digits, or eleven from "1"
_NANP_INTL_RE = re.compile(r"^\+1([2-9]\d{9})$")
_NANP_NATIONAL_RE = re.compile(r"^1?([2-9]\d{9})$")
_NANP_REGIONS = frozenset({"US", "CA"})
_ZIP_US_RE = re.compile(r"^(\d{5})(?:-?\d{4})?$")
# a full UK postcode with its spaces removed, lower case: outward code (area + district), sector digit, unit
_UK_POSTCODE_RE = re.compile(r"^([a-z]{1,2}\d[a-z\d]?)(\d)[a-z]{2}$")
_MADID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_DOB_FORMATS = (
    re.compile(r"^(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})(?:[T ].*)?$"),
    re.compile(r"^(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})$"),
    re.compile(r"^(?P<y>\d{4})/(?P<m>\d{1,2})/(?P<d>\d{1,2})$"),
)
_DOB_SLASH = re.compile(r"^(?P<a>\d{1,2})[/.](?P<b>\d{1,2})[/.](?P<y>\d{4})$")
_TITLES = frozenset({"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sir", "madam", "mme", "mlle", "herr", "frau"})
_SUFFIXES = frozenset({"jr", "sr", "ii", "iii", "iv", "phd", "md", "esq", "dds"})
_GMAIL = frozenset({"gmail.com", "googlemail.com"})
# Day-first countries for dd/mm/yyyy dates; elsewhere (US) mm/dd/yyyy.
_MONTH_FIRST = frozenset({"US", "PH", "CA", "FM", "PW", "MH"})

COUNTRY_NAMES = {
    "united states": "US", "united states of america": "US", "usa": "US", "u.s.": "US", "u.s.a.": "US",
    "america": "US", "united kingdom": "GB", "uk": "GB", "great britain": "GB", "england": "GB",
    "scotland": "GB", "wales": "GB", "northern ireland": "GB", "germany": "DE", "deutschland": "DE",
    "france": "FR", "spain": "ES", "españa": "ES", "italy": "IT", "italia": "IT", "netherlands": "NL",
    "the netherlands": "NL", "holland": "NL", "belgium": "BE", "switzerland": "CH", "austria": "AT",
    "ireland": "IE", "portugal": "PT", "poland": "PL", "sweden": "SE", "norway": "NO", "denmark": "DK",
    "finland": "FI", "canada": "CA", "mexico": "MX", "méxico": "MX", "brazil": "BR", "brasil": "BR",
    "argentina": "AR", "australia": "AU", "new zealand": "NZ", "japan": "JP", "china": "CN", "india": "IN",
    "south korea": "KR", "korea": "KR", "singapore": "SG", "south africa": "ZA", "turkey": "TR",
    "türkiye": "TR", "greece": "GR", "czech republic": "CZ", "czechia": "CZ", "romania": "RO",
    "hungary": "HU", "israel": "IL", "united arab emirates": "AE", "uae": "AE", "saudi arabia": "SA",
}  # fmt: skip
US_STATES = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca", "colorado": "co",
    "connecticut": "ct", "delaware": "de", "district of columbia": "dc", "florida": "fl", "georgia": "ga",
    "hawaii": "hi", "idaho": "id", "illinois": "il", "indiana": "in", "iowa": "ia", "kansas": "ks",
    "kentucky": "ky", "louisiana": "la", "maine": "me", "maryland": "md", "massachusetts": "ma",
    "michigan": "mi", "minnesota": "mn", "mississippi": "ms", "missouri": "mo", "montana": "mt",
    "nebraska": "ne", "nevada": "nv", "new hampshire": "nh", "new jersey": "nj", "new mexico": "nm",
    "new york": "ny", "north carolina": "nc", "north dakota": "nd", "ohio": "oh", "oklahoma": "ok",
    "oregon": "or", "pennsylvania": "pa", "rhode island": "ri", "south carolina": "sc", "south dakota": "sd",
    "tennessee": "tn", "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va", "washington": "wa",
    "west virginia": "wv", "wisconsin": "wi", "wyoming": "wy", "puerto rico": "pr",
}  # fmt: skip
_US_CODES = frozenset(US_STATES.values())
_ISO2 = frozenset(phonenumbers.SUPPORTED_REGIONS) | {"AQ", "BV", "HM", "PN", "TF", "UM", "GS"}

META_ORDER = ("EMAIL", "PHONE", "FN", "LN", "FI", "ZIP", "CT", "ST", "COUNTRY", "GEN", "DOBY", "DOBM", "DOBD",
              "MADID", "EXTERN_ID")  # fmt: skip
GOOGLE_ORDER = ("email", "phone", "first_name", "last_name", "country_code", "postal_code")


@dataclass(slots=True)
class Normalized:
    payload: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # identifier field -> reason code


# ----------------------------------------------------------------------------- field rules


def _clean(value: str | None) -> str:
    if value is None:
        return ""
    return value.strip()


def normalize_email(value: str, platform: PlatformName) -> str | None:
    if len(value) > 320:  # RFC 5321 limits: 64 (local part) + 1 + 255 (domain)
        return None
    e = value.strip().lower()
    if len(e) > 254 or len(e.partition("@")[0]) > 64 or not _EMAIL_RE.match(e):
        return None
    return _google_email(e) if platform == "google" else e


def _google_email(e: str) -> str | None:
    """A cleaned, valid email as Google matches it: Gmail addresses without dots and `+tags`."""
    local, _, domain = e.rpartition("@")
    if domain in _GMAIL:
        local = local.split("+", 1)[0].replace(".", "")
        if not local:
            return None
        return f"{local}@{domain}"
    return e


@lru_cache(maxsize=200_000)
def _parse_phone(value: str, region: str) -> str | None:
    """E.164 of a number `phonenumbers` parses with this region and calls valid; None otherwise. The
    region decides the national trunk prefix and the international prefix (00 in most of Europe, 011 in
    NANP), and a trunk prefix written after the country code (`+44 (0)20 ...`) is dropped."""
    try:
        num = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(num):  # wrong length, unassigned country or area code
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def _us_valid_parts() -> tuple[str, str] | None:
    """The ten-digit national numbers `phonenumbers.is_valid_number` accepts as US numbers, as one
    pattern built from phonenumbers' own metadata: a number matching the US general pattern and one of
    the US number types is valid (US is the first region of country code 1 and has no leading digits,
    so phonenumbers picks it before the other NANP regions). None when the metadata is not shaped so:
    then every number goes through `phonenumbers`."""
    try:
        meta = phonenumbers.PhoneMetadata.metadata_for_region("US")
        if meta is None or meta.leading_digits or phonenumbers.COUNTRY_CODE_TO_REGION_CODE[1][0] != "US":
            return None
        general = meta.general_desc
        if general is None or not general.national_number_pattern or 10 not in general.possible_length:
            return None
        descs = (meta.premium_rate, meta.toll_free, meta.shared_cost, meta.voip, meta.personal_number, meta.pager,
                 meta.uan, meta.voicemail, meta.fixed_line, meta.mobile)  # fmt: skip
        types = [
            d.national_number_pattern
            for d in descs
            if d is not None and d.national_number_pattern and (not d.possible_length or 10 in d.possible_length)
        ]
        if not types:
            return None
        # fixed-line and mobile share one pattern in the US metadata: each pattern once
        return str(general.national_number_pattern), "|".join(f"(?:{t})" for t in dict.fromkeys(types))
    except Exception:  # noqa: BLE001 - metadata of another shape: no fast path
        return None


# (general pattern, any valid type): what `phonenumbers` checks of a US number, also as SQL (RE2) patterns
US_VALID_PARTS = _us_valid_parts()
_US_VALID = (
    re.compile(f"(?=(?:{US_VALID_PARTS[0]})$)(?:{US_VALID_PARTS[1]})$") if US_VALID_PARTS is not None else None
)


def _nanp_fast(compact: str, region: str) -> str | None:
    """E.164 of a plain NANP shape that is a valid US number (the same answer `phonenumbers` gives),
    None for anything else (which then goes through `phonenumbers`)."""
    if _US_VALID is None:
        return None
    m = _NANP_INTL_RE.match(compact)
    if m is None and region in _NANP_REGIONS:
        m = _NANP_NATIONAL_RE.match(compact)
    if m is None or not _US_VALID.match(m.group(1)):
        return None
    return "+1" + m.group(1)


def normalize_phone(value: str, region: str) -> str | None:
    """E.164 with '+', or None for a number that is not valid. Only plain, valid NANP shapes skip
    `phonenumbers`; everything else is parsed and validated by it with the row's or the segment's region."""
    v = value.strip()
    compact = _PHONE_STRIP.sub("", v)
    fast = _nanp_fast(compact, region)
    if fast is not None:
        return fast
    if not any(c.isdigit() for c in compact) or len(value) > 64:
        return None
    return _parse_phone(v, region)


def normalize_name(value: str) -> str | None:
    """Lower case, letters (any script, accents kept) and one space between words; punctuation and
    digits removed, not turned into a space (`Ruiz-Ortega` -> `ruizortega`, `O'Neil` -> `oneil`: both
    platforms say "no punctuation"); titles before and suffixes after the name dropped."""
    s = unicodedata.normalize("NFC", value).lower()
    s = "".join(c if c.isalpha() or unicodedata.category(c)[0] == "M" else (" " if c.isspace() else "") for c in s)
    tokens = s.split()
    while tokens and tokens[0] in _TITLES:
        tokens = tokens[1:]
    while len(tokens) > 1 and tokens[-1] in _SUFFIXES:
        tokens = tokens[:-1]
    out = unicodedata.normalize("NFC", " ".join(tokens))
    return out or None


def normalize_country(value: str) -> str | None:
    """ISO-3166 alpha-2, upper case."""
    v = value.strip()
    if len(v) == 2 and v.isalpha() and v.upper() in _ISO2:
        return v.upper()
    return COUNTRY_NAMES.get(v.lower())


def normalize_zip(value: str, country: str | None, platform: PlatformName) -> str | None:
    """US: the 5-digit ZIP. Google: otherwise as written. Meta: lower case without white space, and a UK
    postcode in Meta's Area/District/Sector form (`SW1A 1AA` -> `sw1a1`); without a country, a value
    shaped like a US ZIP or a full UK postcode is read as one."""
    v = value.strip()
    if country == "US" or (country is None and _ZIP_US_RE.match(v)):
        m = _ZIP_US_RE.match(v)
        return m.group(1) if m else None
    if platform == "meta":
        v = "".join(v.split()).lower()
        if country in ("GB", None) and (uk := _UK_POSTCODE_RE.match(v)):
            return uk.group(1) + uk.group(2)
    if not v or len(v) > 12 or not all(c.isalnum() or c in " -" for c in v):
        return None
    return v


def _roman_letters(value: str) -> str:
    """The letters a-z of a value, accents taken off (`Zürich` -> `zurich`, `Straße` -> `strasse`):
    Meta's rule for CT and ST, "a-z only ... no special characters, no white space"."""
    return "".join(c for c in unicodedata.normalize("NFKD", value.casefold()) if "a" <= c <= "z")


def normalize_city(value: str) -> str | None:
    return _roman_letters(value) or None


def normalize_state(value: str, country: str | None) -> str | None:
    v = value.strip().lower()
    if country in (None, "US"):
        if v in _US_CODES:
            return v
        code = US_STATES.get(v)
        if code:
            return code
        if country == "US":
            return None
    return _roman_letters(v) or None


def normalize_gender(value: str) -> str | None:
    v = value.strip().lower()
    if v in ("m", "male", "man"):
        return "m"
    if v in ("f", "female", "woman"):
        return "f"
    return None


def normalize_dob(value: str, region: str) -> tuple[str, str, str] | None:
    v = value.strip()
    y = m = d = 0
    for rx in _DOB_FORMATS:
        hit = rx.match(v)
        if hit:
            y, m, d = int(hit["y"]), int(hit["m"]), int(hit["d"])
            break
    else:
        hit = _DOB_SLASH.match(v)
        if not hit:
            return None
        a, b, y = int(hit["a"]), int(hit["b"]), int(hit["y"])
        m, d = (a, b) if region in _MONTH_FIRST else (b, a)
    if not (1900 <= y <= datetime.date.today().year and 1 <= m <= 12 and 1 <= d <= 31):  # Meta: 1900 to this year
        return None
    return f"{y:04d}", f"{m:02d}", f"{d:02d}"


def normalize_madid(value: str) -> str | None:
    v = value.strip().lower()
    return v if _MADID_RE.match(v) else None


# ----------------------------------------------------------------------------- normalizer


class Normalizer:
    """Normalizes members of one segment for one platform."""

    def __init__(self, platform: PlatformName | str, fields: Iterable[str], default_region: str = "US") -> None:
        if platform not in ("meta", "google"):
            raise ValueError(f"unknown platform {platform!r}")
        self.platform: PlatformName = "meta" if platform == "meta" else "google"
        self.fields = frozenset(fields)
        self.default_region = default_region.upper()
        self._only_email_phone = self.fields <= {"email", "phone"}
        self._schema = self._make_schema()

    def _make_schema(self) -> tuple[str, ...]:
        f = self.fields
        if self.platform == "google":
            keys = set()
            if "email" in f:
                keys.add("email")
            if "phone" in f:
                keys.add("phone")
            if {"first_name", "last_name", "zip"} <= f:
                keys |= {"first_name", "last_name", "country_code", "postal_code"}
            return tuple(k for k in GOOGLE_ORDER if k in keys)
        mapping = {
            "email": ("EMAIL",), "phone": ("PHONE",), "first_name": ("FN", "FI"), "last_name": ("LN",),
            "zip": ("ZIP",), "city": ("CT",), "state": ("ST",), "country": ("COUNTRY",), "gender": ("GEN",),
            "date_of_birth": ("DOBY", "DOBM", "DOBD"), "mobile_ad_id": ("MADID",), "external_id": ("EXTERN_ID",),
        }  # fmt: skip
        keys = {k for fld in f for k in mapping.get(fld, ())}
        return tuple(k for k in META_ORDER if k in keys)

    def schema(self) -> tuple[str, ...]:
        """The payload keys this segment can fill, in a stable order."""
        return self._schema

    def normalize(self, raw: Mapping[str, str | None]) -> Normalized:
        out = Normalized()
        broken = [f for f, v in raw.items() if v and _LONE_SURROGATE.search(v)]
        if broken:  # not Unicode text (a JSON source's lone surrogate, handed on as U+FFFD): never an identifier
            raw = {f: (None if f in broken else v) for f, v in raw.items()}
            for f in broken:
                out.errors[f] = FIELD_REASONS.get(f, f"{f}_invalid")
        try:
            if self.platform == "google":
                self._google(raw, out)
            else:
                self._meta(raw, out)
        except Exception:  # noqa: BLE001 - a normalizer bug must cost one member, not the batch
            out.payload.clear()
            out.errors["row"] = "normalize_error"
        if not out.payload:
            out.errors.setdefault("member", NO_IDENTIFIER)
        return out

    def _country(self, raw: Mapping[str, str | None], out: Normalized) -> str | None:
        v = _clean(raw.get("country"))
        if not v:
            return None
        c = normalize_country(v)
        if c is None:
            out.errors["country"] = COUNTRY_INVALID
        return c

    def _hashed(self, raw_value: str) -> bool:
        return is_already_hashed(raw_value)

    def _email_phone(self, raw: Mapping[str, str | None], out: Normalized, region: str, email_key: str,
                     phone_key: str) -> None:  # fmt: skip
        e = _clean(raw.get("email"))
        if e:
            if self._hashed(e):
                out.payload[email_key] = e.lower()
            else:
                ne = normalize_email(e, self.platform)
                if ne is None:
                    out.errors["email"] = EMAIL_INVALID
                else:
                    out.payload[email_key] = hash_once(ne)
        p = _clean(raw.get("phone"))
        if p:
            if self._hashed(p):
                out.payload[phone_key] = p.lower()
            else:
                np_ = normalize_phone(p, region)
                if np_ is None:
                    out.errors["phone"] = PHONE_INVALID
                else:
                    out.payload[phone_key] = hash_once(np_ if self.platform == "google" else np_[1:])

    def _google(self, raw: Mapping[str, str | None], out: Normalized) -> None:
        country = self._country(raw, out)
        region = country or self.default_region
        self._email_phone(raw, out, region, "email", "phone")
        fn_raw, ln_raw, zip_raw = _clean(raw.get("first_name")), _clean(raw.get("last_name")), _clean(raw.get("zip"))
        if not (fn_raw or ln_raw or zip_raw):
            return
        fn = fn_raw.lower() if self._hashed(fn_raw) else normalize_name(fn_raw) if fn_raw else None
        ln = ln_raw.lower() if self._hashed(ln_raw) else normalize_name(ln_raw) if ln_raw else None
        if fn_raw and fn is None:
            out.errors["first_name"] = NAME_INVALID
        if ln_raw and ln is None:
            out.errors["last_name"] = NAME_INVALID
        addr_country = country if "country" in self.fields and _clean(raw.get("country")) else self.default_region
        pc = normalize_zip(zip_raw, addr_country, "google") if zip_raw else None
        if zip_raw and pc is None:
            out.errors["zip"] = ZIP_INVALID
        if fn and ln and pc and addr_country:
            out.payload["first_name"] = hash_once(fn)
            out.payload["last_name"] = hash_once(ln)
            out.payload["country_code"] = addr_country
            out.payload["postal_code"] = pc
        else:
            out.errors.setdefault("address", ADDRESS_INCOMPLETE)

    def _meta(self, raw: Mapping[str, str | None], out: Normalized) -> None:
        country = self._country(raw, out)
        region = country or self.default_region
        self._email_phone(raw, out, region, "EMAIL", "PHONE")
        if self._only_email_phone:
            return
        p = out.payload
        for fld, key in (("first_name", "FN"), ("last_name", "LN")):
            v = _clean(raw.get(fld))
            if not v:
                continue
            if self._hashed(v):
                p[key] = v.lower()
                continue
            n = normalize_name(v)
            if n is None:
                out.errors[fld] = NAME_INVALID
            else:
                p[key] = hash_once(n)
                if key == "FN":
                    p["FI"] = hash_once(n[0])
        if country:
            p["COUNTRY"] = hash_once(country.lower())
        z = _clean(raw.get("zip"))
        rules: tuple[tuple[str, str, Callable[[str], str | None], str], ...] = (
            ("zip", "ZIP", lambda v: v.lower() if self._hashed(v) else normalize_zip(v, country, "meta"), ZIP_INVALID),
            ("city", "CT", normalize_city, CITY_INVALID),
            ("state", "ST", lambda v: normalize_state(v, country), STATE_INVALID),
            ("gender", "GEN", normalize_gender, GENDER_INVALID),
        )
        for fld, key, rule, reason in rules:
            v = z if fld == "zip" else _clean(raw.get(fld))
            if v:
                nv = rule(v)
                if nv is None:
                    out.errors[fld] = reason
                else:
                    p[key] = hash_once(nv)
        dob = _clean(raw.get("date_of_birth"))
        if dob:
            nd = normalize_dob(dob, region)
            if nd is None:
                out.errors["date_of_birth"] = DOB_INVALID
            else:
                p["DOBY"], p["DOBM"], p["DOBD"] = (hash_once(x) for x in nd)
        mad = _clean(raw.get("mobile_ad_id"))
        if mad:
            nm = normalize_madid(mad)
            if nm is None:
                out.errors["mobile_ad_id"] = MADID_INVALID
            else:
                p["MADID"] = nm
        ext = _clean(raw.get("external_id"))
        if ext:
            if len(ext) > 256:
                out.errors["external_id"] = EXTERN_ID_INVALID
            else:
                p["EXTERN_ID"] = ext


# ----------------------------------------------------------------------------- batches

def is_already_hashed(value: str) -> bool:
    """A value that is a SHA-256 already (64 hex digits, any case): sent as is, never hashed again."""
    return len(value) == 64 and is_sha256_hex(value)
