"""One chaos scenario: a segment evolves over several steps and is synced by real `connector sync`
processes into the three emulators (Meta Graph, Google Data Manager, Google Ads offline jobs), which
run in this process with their fault knobs on. At random points the sync process is killed with
SIGKILL and started again. After the last step and at most two clean runs, every audience must equal
the segment's members as the reference normalizer (tests/reference_normalize.py, written from the
platforms' documents, not from `connector.identifiers`) says the platform is sent them, and the ledger
must agree with every emulator. A scenario that killed no process or injected no fault is a failure:
it would have tested nothing.

Everything random comes from the scenario's seed (the segment, its changes, the fault knobs, where
kills happen), so a failing seed can be replayed: `python benchmarks/chaos.py --seeds 1 --first SEED -v`.
A kill point is a count, not a time: the process is killed at its N-th write request to the emulators,
either before the platform applies it or after it did and before the process reads the answer. What
stays timing-dependent: the emulators' 0.3 s processing delay (a request still pending when a run
reconciles it) and the throttling waits.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from connector.identifiers.normalize import Normalizer
from connector.ledger.files import MEMBER, ON, OWED, TO_SEND
from connector.ledger.journal import Journal
from connector.ledger.recovery import read_pair
from connector.sandbox.faults import FaultKnobs
from connector.sandbox.google_ads import GoogleAdsEmulator
from connector.sandbox.google_datamanager import DataManagerEmulator
from connector.sandbox.meta_graph import MetaGraphEmulator
from connector.sandbox.server import DropConnection, HttpRequest, HttpResponse
from connector.sandbox.tls import ROOTS_ENV, localhost_certificate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference_normalize import payload as reference_payload

TOKEN = "chaos-meta-token-5f1e9c"
FIELDS = ["customer_id", "email", "phone", "first_name", "last_name", "zip", "country", "consent"]
IDS = ["email", "phone", "first_name", "last_name", "zip", "country"]
# odd seeds map only email and phone: the connector normalizes those in SQL (connector/identifiers/sql.py);
# even seeds map all six, which go through its Python rules: the two paths are checked alike
SQL_IDS = ["email", "phone"]


def mapped(seed: int) -> list[str]:
    return SQL_IDS if seed % 2 else IDS
DESTINATIONS = ("meta", "google_dm", "google_jobs")
FIRST = ["Mary", "José", "Zoë", "Li", "Ahmed", "Åsa", "Chloé", "Björn", "Jean-Luc", "Dr. Anne"]
LAST = ["Smith", "García", "Müller", "O'Neil", "Nguyen", "Dubois", "Rossi", "Smith Jr.", "Ruiz-Ortega"]
# where the normalization rules differ: Gmail dots and +tags (Google drops them, Meta keeps them),
# upper case, googlemail.com, other domains that keep their dots and tags
DOMAINS = ["Example.com", "gmail.com", "GMAIL.com", "googlemail.com", "shop.co.uk"]


@dataclass
class Outcome:
    seed: int
    steps: int = 0
    runs: int = 0
    kills: int = 0
    source_failures: int = 0
    full_refreshes: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    writes: int = 0  # write requests the emulators received from sync processes
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())


class Segment:
    """The segment as the shop sees it: rows keyed by customer id, mutated step by step."""

    def __init__(self, rng: random.Random, ids: list[str]) -> None:
        self.rng = rng
        self.ids = ids  # the identifier fields the segment maps
        self.next_id = 0
        self.rows: dict[str, dict[str, str]] = {}
        for _ in range(rng.randint(40, 160)):
            self.add()

    def person(self, i: int) -> dict[str, str]:
        r = self.rng
        local = f"{r.choice(['', ' ', 'Mr.'])}{r.choice(FIRST).replace(' ', '')}.{i}{r.choice(['', '', '+promo', '.x+Tag'])}"
        email = f"{local}@{r.choice(DOMAINS)}"
        country = r.choice(["US", "US", "GB", ""])
        phone = r.choice([f"+1 415 555 {i % 10000:04d}", f"(415) 555-{i % 10000:04d}", f"+44 20 7946 {i % 10000:04d}",
                          f"020 7946 {i % 10000:04d}", f"001 415 555 {i % 10000:04d}"])  # fmt: skip
        if r.random() < 0.08:  # garbage a shop really has: some identifiers are unusable
            email, phone = r.choice(["n/a", "", "@@", "x@"]), r.choice(["", "123", "call me"])
        return {"customer_id": f"C{i}", "email": email.strip(), "phone": phone, "first_name": r.choice(FIRST),
                "last_name": r.choice(LAST), "zip": r.choice(["94107", "10001-1234", "SW1A 1AA", " ec1a 1bb "]),
                "country": country, "consent": "denied" if r.random() < 0.1 else "granted"}  # fmt: skip

    def add(self) -> None:
        row = self.person(self.next_id)
        self.rows[row["customer_id"]] = row
        self.next_id += 1

    def evolve(self) -> str:
        r = self.rng
        keys = list(self.rows)
        removed = r.sample(keys, k=int(len(keys) * r.uniform(0, 0.15)))
        for k in removed:
            del self.rows[k]
        added = int(len(keys) * r.uniform(0, 0.25))
        for _ in range(added):
            self.add()
        changed = flipped = 0
        for row in self.rows.values():
            x = r.random()
            if x < 0.08:
                row["email"] = f"{r.choice(FIRST)}.new{self.next_id}.{changed}@example.org"
                changed += 1
            elif x < 0.12:
                row["phone"] = f"+1 212 555 {r.randint(0, 9999):04d}"
                changed += 1
            elif x < 0.18:
                row["consent"] = "denied" if row["consent"] == "granted" else "granted"
                flipped += 1
        return f"-{len(removed)} +{added} ~{changed} consent flips {flipped}"

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(self.rows.values())
        tmp.replace(path)

    def expected(self, platform: str, meta_faults: FaultKnobs | None = None) -> dict[str, frozenset[tuple[str, str]]]:
        """customer id -> the member the platform should hold, as the reference normalizer sends it
        (only the segment's mapped identifier fields, default region US)."""
        out: dict[str, frozenset[tuple[str, str]]] = {}
        for key, row in self.rows.items():
            if platform == "google" and row["consent"] == "denied":
                continue
            payload = reference_payload(platform, {k: row[k] for k in self.ids}, "US")
            if not payload:
                continue
            if meta_faults is not None and any(meta_faults.rejects(v, count=False) for k, v in payload.items() if k != "EXTERN_ID"):
                continue  # Meta refuses this value every time: reported in invalid_entry_samples, never added
            out[key] = frozenset(payload.items())
        return out


@dataclass(frozen=True)
class KillPoint:
    """Kill the sync process at its `write`-th write request to any emulator (counted from 1 across
    all three): before the platform applies it, or (`after_apply`) once the platform has applied it
    and before the process reads the answer. When that request is refused by an injected fault, the
    kill moves to the next write the platform applies. A run with fewer writes is not killed."""

    write: int
    after_apply: bool

    def __str__(self) -> str:
        return f"write {self.write} {'after' if self.after_apply else 'before'} the platform applied it"


class KillSwitch:
    """Counts the write requests of the sync process being run and SIGKILLs it at its kill point,
    from inside the emulator that received the request (so the kill lands on the same request on any
    machine, however fast). Write requests arriving when no process is armed are not counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._point: KillPoint | None = None
        self._due = False
        self.writes = 0
        self.fired = False

    @contextmanager
    def armed(self, start: Callable[[], subprocess.Popen[bytes]], point: KillPoint | None) -> Iterator[subprocess.Popen[bytes]]:
        with self._lock:  # held while the process starts: no request can be counted before it is known
            self._proc, self._point, self._due, self.writes, self.fired = None, point, False, 0, False
            self._proc = start()
        try:
            yield self._proc
        finally:
            with self._lock:
                self._proc = None

    def before_write(self) -> bool:
        """A write request arrived. True when the process was just killed and the platform must not
        apply the request (the caller drops the connection)."""
        with self._lock:
            if self._proc is None or self.fired:
                return False
            self.writes += 1
            if self._point is None or self.writes < self._point.write:
                return False
            if self._point.after_apply:
                self._due = True
                return False
            self._kill()
            return True

    def after_write(self) -> None:
        """The platform applied a write request and is about to answer it."""
        with self._lock:
            if self._due and not self.fired and self._proc is not None:
                self._kill()

    def _kill(self) -> None:
        assert self._proc is not None
        self._proc.kill()  # SIGKILL: pending before the answer is written, so the process never reads it
        self.fired = True


class KillableMeta(MetaGraphEmulator):
    def __init__(self, switch: KillSwitch, **kw: Any) -> None:
        self.switch = switch
        super().__init__(**kw)

    def handle(self, req: HttpRequest) -> HttpResponse:
        return _killable_http(self.switch, req, super().handle)


class KillableDataManager(DataManagerEmulator):
    def __init__(self, switch: KillSwitch, **kw: Any) -> None:
        self.switch = switch
        super().__init__(**kw)

    def handle(self, req: HttpRequest) -> HttpResponse:
        return _killable_http(self.switch, req, super().handle)


def _killable_http(switch: KillSwitch, req: HttpRequest, handle: Callable[[HttpRequest], HttpResponse]) -> HttpResponse:
    if req.method == "GET":
        return handle(req)
    if switch.before_write():
        raise DropConnection()
    resp = handle(req)
    if resp.status < 300:
        switch.after_write()
    return resp


class KillableAds(GoogleAdsEmulator):
    def __init__(self, switch: KillSwitch, **kw: Any) -> None:
        self.switch = switch
        super().__init__(**kw)

    def _wrap(self, fn: Callable[[Any, grpc.ServicerContext], Any], write: bool) -> Callable[[Any, grpc.ServicerContext], Any]:
        inner = super()._wrap(fn, write)
        if not write:
            return inner
        switch = self.switch

        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            if switch.before_write():
                context.abort(grpc.StatusCode.UNAVAILABLE, "the client was killed")
            result = inner(request, context)  # an injected fault aborts: nothing applied, no kill here
            switch.after_write()
            return result

        return handler


class Emulators:
    def __init__(self, rng: random.Random, seed: int) -> None:
        self.switch = KillSwitch()

        def knobs(errors: dict[str, float], **kw: Any) -> FaultKnobs:
            # every kind of fault has a floor: a scenario with no fault at all tests nothing
            return FaultKnobs(error_rates=errors, throttle_rate=rng.uniform(0.02, 0.1), throttle_retry_after=0.05,
                              latency_seconds=rng.uniform(0.0, 0.08), drop_rate=rng.uniform(0.02, 0.1),
                              drop_after_apply=rng.random() < 0.5, seed=seed, **kw)  # fmt: skip

        self.meta = KillableMeta(self.switch, expected_token=TOKEN,
                                 faults=knobs({"2": rng.uniform(0.03, 0.15)}, reject_rate=rng.choice([0, 0.05])))  # fmt: skip
        self.dm = KillableDataManager(self.switch, processing_delay_seconds=rng.choice([0.0, 0.3]),
                                      faults=knobs({"UNAVAILABLE": rng.uniform(0.03, 0.2), "ABORTED": rng.uniform(0, 0.05)}))  # fmt: skip

        def seed_size(list_id: str) -> int | None:
            entry = self.dm.lists.get(list_id)
            return None if entry is None else len(entry["members"])

        self.ads = KillableAds(self.switch, faults=knobs({"CONCURRENT_MODIFICATION": rng.uniform(0.02, 0.1),
                                                          "TRANSIENT_ERROR": rng.uniform(0.02, 0.1)}),
                               processing_delay_seconds=rng.choice([0.0, 0.3]), seed_sizes=seed_size)  # fmt: skip

    @contextmanager
    def running(self) -> Iterator[Emulators]:
        with ExitStack() as stack:
            for emu in (self.meta, self.dm, self.ads):
                stack.enter_context(emu)
            yield self

    def faults(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, emu in (("meta", self.meta), ("dm", self.dm), ("ads", self.ads)):
            for what, n in emu.faults.injected.items():
                out[f"{name}:{what}"] = n
        return out

    def audience(self, dest: str, audience_id: str) -> set[frozenset[tuple[str, str]]]:
        if dest == "meta":
            return self.meta.member_dicts(audience_id)
        emu = self.dm if dest == "google_dm" else self.ads
        return {frozenset((k, v) for k, v in row if v) for row in emu.members(audience_id)}


def write_config(workdir: Path, emus: Emulators, segment: str, ids: list[str], ledger_url: str | None) -> Path:
    cfg = workdir / "connector.toml"
    retry = "max_attempts = 12\nbackoff_max_seconds = 0.2\ntimeout_seconds = 10"
    cfg.write_text(f"""state_dir = "state"
{f'ledger_url = "{ledger_url}"' if ledger_url else ""}
max_remove_share = 0.5
[destinations.meta]
type = "meta"
ad_account_id = "act_77"
graph_url = "{emus.meta.url}"
{retry}
[destinations.google_dm]
type = "google"
customer_id = "1234567890"
customer_match_terms = "accepted"
sandbox = true
datamanager_endpoint = "{emus.dm.url}"
{retry}
[destinations.google_jobs]
type = "google"
customer_id = "1234567890"
customer_match_terms = "accepted"
upload_api = "google_ads"
sandbox = true
google_ads_endpoint = "{emus.ads.endpoint}"
{retry}
[segments.{segment}]
source = {{ type = "csv", path = "members.csv" }}
key = "customer_id"
identifiers = {{ {", ".join(f'{f} = "{f}"' for f in ids)} }}
consent = {{ ad_user_data_column = "consent" }}
destinations = {list(DESTINATIONS)!r}
""".replace("'", '"'), encoding="utf-8")  # fmt: skip
    return cfg


class Syncer:
    """Starts `connector sync` processes; the emulators' kill switch SIGKILLs one at its kill point."""

    def __init__(self, workdir: Path, cfg: Path, switch: KillSwitch) -> None:
        self.workdir, self.cfg, self.switch = workdir, cfg, switch
        self.env = {**os.environ, "CONNECTOR_DESTINATIONS__META__ACCESS_TOKEN": TOKEN,
                    ROOTS_ENV: os.environ[ROOTS_ENV], "PYTHONUNBUFFERED": "1"}  # fmt: skip
        self.n = 0
        self.writes = 0  # write requests of every run so far

    def run(self, kill: KillPoint | None, *args: str, timeout: float = 120) -> tuple[int | None, dict[str, Any] | None, str]:
        """(exit code or None when killed, the --json document, stderr). `timeout` only guards against a
        hung process (a failure); kills come from the kill point."""
        self.n += 1
        out, err = self.workdir / f"run{self.n}.out", self.workdir / f"run{self.n}.err"
        cmd = [sys.executable, "-m", "connector", "sync", "--config", str(self.cfg), "--json", *args]
        with out.open("wb") as fo, err.open("wb") as fe:
            start = lambda: subprocess.Popen(cmd, stdout=fo, stderr=fe, env=self.env, cwd=self.workdir)  # noqa: E731
            with self.switch.armed(start, kill) as proc:
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise AssertionError(f"sync did not finish in {timeout} s: {err.read_text()[-2000:]}") from None
        self.writes += self.switch.writes
        if self.switch.fired:
            assert proc.returncode == -signal.SIGKILL, f"killed at {kill}, yet exit {proc.returncode}"
            return None, None, err.read_text(errors="replace")
        text = out.read_text()
        return proc.returncode, (json.loads(text) if text.strip() else None), err.read_text(errors="replace")


def scan_for_leaks(seg: Segment, emus: Emulators, workdir: Path, out: Outcome) -> None:
    """Every byte the sync processes wrote (stdout, stderr, ledger, spill files) and every request the
    emulators received: no token, no raw email or phone."""
    raw = {TOKEN}
    for r in seg.rows.values():
        if "@" in r["email"] and len(r["email"]) > 5:
            raw |= {r["email"], r["email"].lower()}
        if sum(c.isdigit() for c in r["phone"]) >= 10:
            raw.add(r["phone"])
    needles = [x.encode() for x in raw]
    for path in workdir.rglob("*"):
        if path.is_file() and path.name not in ("members.csv", "members.tmp", "connector.toml"):
            data = path.read_bytes()
            leaked = [n.decode() for n in needles if n in data]
            if leaked:
                out.mismatches.append(f"leak: {path.relative_to(workdir)} holds {len(leaked)} raw values/tokens")
    wire = "\n".join(e.get("path", "") + e.get("body", "") + str(e.get("query", "")) + str(e.get("query_keys", ""))
                     for e in [*emus.meta.request_log, *emus.dm.request_log])  # fmt: skip
    if any(x in wire for x in raw if x != TOKEN) or TOKEN in wire:
        out.mismatches.append("leak: a raw identifier or the token went over the wire outside the auth header")


def check(seg: Segment, emus: Emulators, workdir: Path, out: Outcome, name: str, ledger_url: str | None) -> None:
    scan_for_leaks(seg, emus, workdir, out)
    ledger = Journal(ledger_url or f"sqlite:///{workdir / 'state' / 'ledger.db'}")
    try:
        for dest in DESTINATIONS:
            platform = "meta" if dest == "meta" else "google"
            expected = seg.expected(platform, emus.meta.faults if dest == "meta" else None)
            record = ledger.get_audience(name, dest)
            if record is None or not record.audience_id:
                if expected:
                    out.mismatches.append(f"{dest}: no audience recorded in the ledger")
                continue
            have = emus.audience(dest, record.audience_id)
            want = set(expected.values())
            if have != want:
                out.mismatches.append(f"{dest}: platform has {len(have)}, segment {len(want)}: "
                                      f"{len(have - want)} extra, {len(want - have)} missing")  # fmt: skip
            keys = Normalizer(platform, seg.ids, "US").schema()
            rows = read_pair(ledger, workdir / "state" / "members", name, dest, keys).to_pylist()
            present = {frozenset((k, r[k]) for k in keys if r[k]) for r in rows if r["kind"] == MEMBER and r["st"] == ON}
            if present != have:
                out.mismatches.append(f"{dest}: ledger says {len(present)} on the platform, platform has {len(have)}")
            adds = sum(1 for r in rows if r["kind"] == MEMBER and r["st"] not in (ON, 2))
            removes = sum(1 for r in rows if r["kind"] == OWED and r["st"] == TO_SEND)
            if adds or removes:
                out.mismatches.append(f"{dest}: ledger still has {adds} adds / {removes} removes pending")
    finally:
        ledger.close()


FIRST_KILL_WRITES = 5  # the first run's kill point: one of its first five write requests
KILL_WRITES = 14  # later runs: one of their first 14 (a run of a step writes about 10 to 15 times, Google Ads last)


def run_scenario(seed: int, workdir: Path, *, steps: int = 4, kill_rate: float = 0.5, verbose: bool = False,
                 ledger_url: str | None = None) -> Outcome:
    """`ledger_url`: a PostgreSQL ledger instead of the SQLite file (shared: the segment gets a unique name)."""
    started = time.monotonic()
    localhost_certificate()  # the gRPC emulator's certificate; its file is the sync processes' trusted root
    rng = random.Random(seed)
    out = Outcome(seed=seed)
    workdir.mkdir(parents=True, exist_ok=True)
    seg = Segment(rng, mapped(seed))
    emus = Emulators(rng, seed)

    def note(msg: str) -> None:
        out.log.append(msg)
        if verbose:
            print(f"[seed {seed}] {msg}", file=sys.stderr)

    with emus.running():
        name = f"chaos_{seed}_{uuid.uuid4().hex[:8]}" if ledger_url else "chaos"
        syncer = Syncer(workdir, write_config(workdir, emus, name, seg.ids, ledger_url), emus.switch)
        csv_path = workdir / "members.csv"
        for step in range(steps):
            out.steps += 1
            what = "initial" if step == 0 else seg.evolve()
            if step and rng.random() < 0.2:  # the export is briefly missing: the run fails, nothing changes
                csv_path.unlink(missing_ok=True)
                code, doc, err = syncer.run(None)
                out.runs += 1
                out.source_failures += 1
                note(f"step {step}: source missing -> exit {code}")
                if code != 1 or "members.csv" not in err:
                    out.mismatches.append(f"step {step}: a missing source gave exit {code}: {err[-500:]}")
            seg.write(csv_path)
            note(f"step {step}: {what}, {len(seg.rows)} rows" + (f", mapped {', '.join(seg.ids)}" if step == 0 else ""))
            for attempt in range(3):
                # the scenario's first run is always killed (its first sync writes to all three
                # emulators, at least six write requests); later runs at random
                first = step == 0 and attempt == 0
                armed = rng.random() < kill_rate or first
                point = KillPoint(rng.randint(1, FIRST_KILL_WRITES if first else KILL_WRITES), rng.random() < 0.5)
                code, doc, err = syncer.run(point if armed else None)
                out.runs += 1
                if code is None:
                    out.kills += 1
                    note(f"step {step}: killed at {point}")
                    if rng.random() < 0.5:
                        break  # the segment changes again before anyone restarts the sync
                    continue
                note(f"step {step}: exit {code} after {syncer.switch.writes} writes"
                     + (f" (the kill at write {point.write} never came)" if armed else "") + " "
                     + " ".join(f"{r['destination']}:{r['status']}+{r['adds']}-{r['removes']}" for r in (doc or {}).get("runs", [])))  # fmt: skip
                if code != 0:
                    note(f"stderr: {err[-800:]}")
                break
            if step and rng.random() < 0.15:
                # a full refresh (replace) under faults; never killed: a Meta audience whose replace session
                # was abandoned refuses every change for the platform's 90-minute window
                code, doc, err = syncer.run(None, "--full-refresh")
                out.runs += 1
                out.full_refreshes += 1
                note(f"step {step}: full refresh -> exit {code} " + " ".join(
                    f"{r['destination']}:{r['status']}" for r in (doc or {}).get("runs", [])))  # fmt: skip
                if code != 0:
                    note(f"stderr: {err[-800:]}")
        # at most two clean runs (faults stay on; no kills)
        for clean in range(2):
            code, doc, err = syncer.run(None)
            out.runs += 1
            runs = (doc or {}).get("runs", [])
            note(f"clean run {clean + 1}: exit {code} " + " ".join(
                f"{r['destination']}:{r['status']}+{r['adds']}-{r['removes']}" for r in runs))  # fmt: skip
            if code != 0:
                note(f"stderr: {err[-1500:]}")
        if code != 0:
            out.mismatches.append(f"the last clean run failed (exit {code}): {err[-600:]}")
        elif any(r["adds"] or r["removes"] for r in runs):
            out.mismatches.append(f"the second clean run still changed something: {runs}")
        check(seg, emus, workdir, out, name, ledger_url)
    out.faults = emus.faults()
    out.writes = syncer.writes
    if out.kills == 0:
        out.mismatches.append("no sync process was killed: the scenario tested no crash")
    if out.faults_injected == 0:
        out.mismatches.append("no fault was injected: the scenario tested no platform failure")
    out.seconds = time.monotonic() - started
    return out


OUTCOMES: list[Outcome] = []  # the scenarios this pytest session ran (printed at its end)


def summary(outcomes: list[Outcome]) -> str:
    faults = sum(o.faults_injected for o in outcomes)
    return (f"chaos: {len(outcomes)} scenarios, {sum(o.runs for o in outcomes)} sync processes, {faults} faults injected, "
            f"{sum(o.kills for o in outcomes)} kills, {sum(o.source_failures for o in outcomes)} source failures, "
            f"{sum(o.full_refreshes for o in outcomes)} full refreshes, {sum(o.writes for o in outcomes)} write requests, "
            f"{sum(len(o.mismatches) for o in outcomes)} mismatches")  # fmt: skip
