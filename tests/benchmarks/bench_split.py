"""Benchmark of the isolation core: time and memory of ``isolate()`` per message and per copy.

Run from the repository root (it is a script, not a test: pytest does not collect it)::

    .venv/bin/python tests/benchmarks/bench_split.py           # full run, about 30 seconds
    .venv/bin/python tests/benchmarks/bench_split.py --quick   # smoke run, a few seconds

Each case is one realistic message split for 1, 100 or 1,000 envelope recipients: a
header section of about 1 KB (Received, From, Reply-To, Cc, Subject, Message-ID, Date,
MIME-Version, list and client fields) plus a ``To:`` that lists every recipient folded
over many lines (the mistake the relay exists to fix), and a multipart/alternative body
(text/plain and quoted-printable text/html) filled so that the message without its
``To:`` list reaches the nominal size of 1 KB, 100 KB or 10 MB; from 100 KB on, half of
the body is a base64 attachment in a multipart/mixed wrapper.

Aims:

* per-copy header work well under 1 ms per copy (the "us/copy off" column for many
  recipients, and the marginal cost of one more copy printed under the table, which
  leaves out the per-message work: parsing, MIME walk, body scan);
* peak extra memory of one ``isolate()`` call a small multiple of one message (the
  "peak/msg" column; the message bytes exist before tracing starts and are not counted).

Timings are the best of N calls with the cyclic garbage collector off (as ``timeit``
does), WARN and OFF calls alternated; N adapts so each case stays near one second (at
least two calls per mode, so the 10 MB cases run twice each). Figures on a busy machine
vary by 10-20 %. Sanity checks (one copy per recipient, one shared body
object) run on every case; the script exits non-zero if any fails or if the core
rejects a message.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import gc
import platform
import random
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Import this checkout's package even without the editable install.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import relay
from relay.core.errors import Rejected
from relay.core.isolation import isolate
from relay.core.model import BodyCheck, Envelope, IsolationOptions, Plan

KB = 1024
MB = 1024 * KB
SIZES: tuple[tuple[str, int], ...] = (("1 KB", KB), ("100 KB", 100 * KB), ("10 MB", 10 * MB))
RECIPIENT_COUNTS: tuple[int, ...] = (1, 100, 1000)
QUICK_SIZES = SIZES[:2]
QUICK_RECIPIENT_COUNTS = RECIPIENT_COUNTS[:2]

SENDER = "sender@example.org"
# Three in five recipients at example.com, one each at example.net and example.org.
RECIPIENT_DOMAINS = ("example.com", "example.net", "example.com", "example.org", "example.com")
ATTACHMENT_FROM = 100 * KB  # messages this large carry an attachment
ATTACHMENT_SHARE = 0.5  # of the body, when there is one
TEXT_SHARE = 0.3  # of the alternative part; the HTML part gets the rest
FOLD_WIDTH = 78  # RFC 5322 2.1.1 "should" limit for header lines

BUDGET_SECONDS = 0.9  # per case, both modes together
QUICK_BUDGET_SECONDS = 0.3
MAX_REPS = 500
MIN_REPS = 2  # best of at least two: the first call also warms caches

WARN = IsolationOptions(body_check=BodyCheck.WARN)
OFF = IsolationOptions(body_check=BodyCheck.OFF)

ALT_BOUNDARY = "=_alt_5f2c9a17e04b"
MIX_BOUNDARY = "=_mix_8d41b6e3a920"
CRLF = b"\r\n"

_VOCABULARY = (
    "order shipping delivery catalogue season offer discount customer account summer "
    "collection garden kitchen outdoor tools lighting furniture bedding storage gift "
    "voucher review rating warranty return refund payment invoice reminder update news "
    "weekly selection favourite arrival limited stock popular recommended service "
    "support opening hours store branch online checkout newsletter preference privacy "
    "the and for with your our this that from you can now are new all more best free"
)
_WORDS = tuple(_VOCABULARY.split())


@dataclass(frozen=True, slots=True)
class Case:
    label: str
    nominal: int
    recipients: int


@dataclass(frozen=True, slots=True)
class Result:
    case: Case
    copies: int
    message_bytes: int
    warn_seconds: float  # best total time of one isolate() call, body check WARN
    off_seconds: float  # the same with the body check OFF
    reps: int  # calls timed per mode
    peak_bytes: int  # tracemalloc peak during one WARN call
    warnings: int  # Plan.warnings of the WARN call (the body names no recipient: 0)


def recipient_addresses(count: int) -> list[str]:
    return [
        f"customer{i:05d}@{RECIPIENT_DOMAINS[i % len(RECIPIENT_DOMAINS)]}" for i in range(count)
    ]


def fold(name: str, items: Sequence[str]) -> bytes:
    """``name: a, b, c`` folded before an item whenever the line would pass FOLD_WIDTH."""
    lines: list[str] = []
    line = f"{name}:"
    for number, item in enumerate(items):
        piece = item if number == len(items) - 1 else item + ","
        if len(line) + 1 + len(piece) > FOLD_WIDTH and line != f"{name}:":
            lines.append(line)
            line = " " + piece
        else:
            line = f"{line} {piece}"
    lines.append(line)
    return "".join(f"{text}\r\n" for text in lines).encode("ascii")


def to_field(addresses: Sequence[str]) -> bytes:
    """Every recipient, every other one with a display name, as an address book writes it."""
    items = [
        f"Customer {address[8:13]} <{address}>" if i % 2 == 0 else address
        for i, address in enumerate(addresses)
    ]
    return fold("To", items)


def header_section(to: bytes, content_type: str) -> bytes:
    """About 1 KB of fields a shop's mail client sends, with ``to`` after ``From:``."""
    before = (
        "Received: from [192.0.2.25] (office-pc.example.org [192.0.2.25])\r\n"
        "\tby submit.example.org (Postfix) with ESMTPSA id 4VxK2d1Zq8z9tQ\r\n"
        "\t; Mon, 03 Jun 2024 09:15:02 +0200 (CEST)\r\n"
        "From: Example Shop <sender@example.org>\r\n"
        "Reply-To: Example Shop Customer Service <help@example.org>\r\n"
    )
    after = (
        "Cc: Sales Team <sales@example.org>, Accounts <accounts@example.net>\r\n"
        "Subject: Your June newsletter: new arrivals, order updates and 15% off\r\n"
        " garden furniture until the end of the month\r\n"
        "Message-ID: <20240603091502.4VxK2d1Zq8z9tQ.1717398902@mail.example.org>\r\n"
        "Date: Mon, 03 Jun 2024 09:15:02 +0200\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: {content_type};\r\n boundary="{_boundary(content_type)}"\r\n'
        "Content-Language: en-GB\r\n"
        "X-Mailer: Microsoft Outlook 16.0\r\n"
        "Thread-Index: AdqnE3kT2m1X0c9hQbWvL8Ukq7J3aQ==\r\n"
        "List-Unsubscribe: <mailto:unsubscribe@example.org?subject=unsubscribe>,\r\n"
        " <https://shop.example.org/newsletter/unsubscribe?list=june-2024>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        "X-Priority: 3\r\n"
    )
    return before.encode("ascii") + to + after.encode("ascii") + CRLF


def _boundary(content_type: str) -> str:
    return MIX_BOUNDARY if content_type == "multipart/mixed" else ALT_BOUNDARY


def _fill(pool: Sequence[bytes], size: int) -> bytes:
    """Whole items of ``pool``, cycled, up to ``size`` bytes (at least one item)."""
    block = b"".join(pool)
    rounds, rest = divmod(max(size, 0), len(block))
    tail = []
    for item in pool:
        if len(item) > rest:
            break
        tail.append(item)
        rest -= len(item)
    if not rounds and not tail:
        tail.append(pool[0])
    return block * rounds + b"".join(tail)


def _text_lines(rng: random.Random) -> list[bytes]:
    lines = []
    for number in range(400):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < 60:
            words.append(rng.choice(_WORDS))
        text = " ".join(words).capitalize()
        if number % 7 == 0:
            text += f" from \u20ac{rng.randint(5, 400)}.99"  # 8-bit UTF-8, as clients send it
        if number % 50 == 49:
            text += " Questions? Write to help@example.org"
        lines.append(text.encode("utf-8") + CRLF)
    return lines


def _html_lines(rng: random.Random) -> list[bytes]:
    lines = []
    for number in range(400):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 12)))
        if number % 3 == 0:
            product = rng.randint(10000, 99999)
            link = (
                f'<a href="https://shop.example.org/p/{product}?utm_source=newsletter&amp;'
                f'utm_medium=email" style="color:#0b6e4f;text-decoration:underline">'
                f"View &amp; order</a> &euro;{rng.randint(5, 400)}.99"
            )
        else:
            link = ""
        html = (
            '<tr><td style="padding:8px 16px;font:14px/20px Arial,sans-serif;color:#333333">'
            f"{words.capitalize()}. {link}</td></tr>"
        )
        if number % 50 == 49:
            html += '<tr><td><a href="mailto:help@example.org">help@example.org</a></td></tr>'
        encoded = binascii.b2a_qp(html.encode("utf-8")).replace(b"\n", CRLF)
        lines.append(encoded + CRLF)
    return lines


def build_body(nominal: int, size: int, rng: random.Random) -> tuple[str, bytes]:
    """The body and its top-level content type, about ``size`` bytes."""
    with_attachment = nominal >= ATTACHMENT_FROM
    alternative_size = int(size * (1 - ATTACHMENT_SHARE)) if with_attachment else size
    text = _fill(_text_lines(rng), int(alternative_size * TEXT_SHARE))
    html_pool = _html_lines(rng)
    head = b'<!DOCTYPE html>\r\n<html><head><meta charset=3D"utf-8"></head><body><table>\r\n'
    tail = b"</table></body></html>\r\n"
    html = head + _fill(html_pool, alternative_size - len(text) - len(head) - len(tail)) + tail
    alt = ALT_BOUNDARY.encode("ascii")
    alternative = b"".join(
        [
            b"--" + alt + CRLF,
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Transfer-Encoding: 8bit\r\n\r\n",
            text,
            b"\r\n--" + alt + CRLF,
            b"Content-Type: text/html; charset=utf-8\r\n",
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
            html,
            b"\r\n--" + alt + b"--\r\n",
        ]
    )
    if not with_attachment:
        return "multipart/alternative", alternative
    # base64 turns 57 bytes into a 76-character line plus CRLF
    raw = rng.randbytes(int(size * ATTACHMENT_SHARE) * 57 // 78)
    attachment = base64.encodebytes(raw).replace(b"\n", CRLF)
    mix = MIX_BOUNDARY.encode("ascii")
    mixed = b"".join(
        [
            b"This is a multi-part message in MIME format.\r\n\r\n",
            b"--" + mix + CRLF,
            b'Content-Type: multipart/alternative;\r\n boundary="' + alt + b'"\r\n\r\n',
            alternative,
            b"\r\n--" + mix + CRLF,
            b'Content-Type: application/pdf; name="catalogue-june-2024.pdf"\r\n',
            b'Content-Disposition: attachment; filename="catalogue-june-2024.pdf"\r\n',
            b"Content-Transfer-Encoding: base64\r\n\r\n",
            attachment,
            b"\r\n--" + mix + b"--\r\n",
        ]
    )
    return "multipart/mixed", mixed


def build_message(body: tuple[str, bytes], addresses: Sequence[str]) -> bytes:
    content_type, content = body
    return header_section(to_field(addresses), content_type) + content


def _timed(envelope: Envelope, data: bytes, options: IsolationOptions) -> tuple[float, Plan]:
    start = time.perf_counter()
    plan = isolate(envelope, data, options)
    return time.perf_counter() - start, plan


def best_times(
    envelope: Envelope, data: bytes, budget: float, check: Callable[[Plan], None]
) -> tuple[float, float, int]:
    """Best wall times of WARN and OFF calls, alternated so drift hits both, and N per mode.

    N is fitted to ``budget`` from the first pair; ``check`` sees the first plan of each mode.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        warn, plan = _timed(envelope, data, WARN)
        check(plan)
        off, plan = _timed(envelope, data, OFF)
        check(plan)
        del plan
        reps = max(MIN_REPS, min(MAX_REPS, int(budget / max(warn + off, 1e-9))))
        for _ in range(reps - 1):
            warn = min(warn, _timed(envelope, data, WARN)[0])
            off = min(off, _timed(envelope, data, OFF)[0])
    finally:
        if was_enabled:
            gc.enable()
    return warn, off, reps


def traced_peak(envelope: Envelope, data: bytes, options: IsolationOptions) -> tuple[int, Plan]:
    """Peak memory traced during one call; ``data`` and ``envelope`` already exist."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        plan = isolate(envelope, data, options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, plan


class SanityError(Exception):
    pass


def checker(case: Case, envelope: Envelope, data: bytes) -> Callable[[Plan], None]:
    body_length = len(data) - (data.index(b"\r\n\r\n") + 4)

    def check(plan: Plan) -> None:
        where = f"{case.label} x {case.recipients}"
        if len(plan.copies) != len(envelope.recipients):
            raise SanityError(
                f"{where}: {len(plan.copies)} copies for {len(envelope.recipients)} recipients"
            )
        body = plan.copies[0].body
        if any(copy.body is not body for copy in plan.copies):
            raise SanityError(f"{where}: the copies do not share one body object")
        if len(body) != body_length:
            raise SanityError(f"{where}: body is {len(body)} bytes, expected {body_length}")

    return check


def run_case(case: Case, body: tuple[str, bytes], budget: float) -> Result:
    addresses = recipient_addresses(case.recipients)
    data = build_message(body, addresses)
    envelope = Envelope.parse(SENDER, addresses)
    check = checker(case, envelope, data)
    warn_seconds, off_seconds, reps = best_times(envelope, data, budget, check)
    peak, plan = traced_peak(envelope, data, WARN)
    check(plan)
    return Result(
        case,
        len(plan.copies),
        len(data),
        warn_seconds,
        off_seconds,
        reps,
        peak,
        len(plan.warnings),
    )


COLUMNS = (
    ("size", 6),
    ("rcpts", 5),
    ("copies", 6),
    ("msg KB", 9),
    ("total ms", 9),
    ("us/copy", 9),
    ("us/copy", 9),
    ("scan ms", 9),
    ("peak MB", 8),
    ("peak/msg", 8),
    ("reps", 5),
)
SUBHEADS = ("", "", "", "actual", "warn", "warn", "off", "", "traced", "", "")

LEGEND = """\
Columns:
  size      nominal size class: the message without its To: list (headers ~1 KB + body)
  rcpts     envelope recipients (customerNNNNN@ at example.com/.net/.org)
  copies    copies in the plan (one per unique recipient)
  msg KB    actual message size in KB, To: list of every recipient included
  total ms  best wall time of one isolate() call, body check WARN (the default)
  us/copy   that total divided by the copies (us = microseconds): WARN, then with the
            body check OFF; OFF leaves parsing, the MIME walk, the split and the per-copy
            leak guard, so with many copies it approaches the per-copy header work
            (aim: well under 1000 us; see the marginal figures below the table)
  scan ms   WARN minus OFF totals: the body scan, once per message (noise when tiny)
  peak MB   tracemalloc peak of one WARN call, the message bytes not included
  peak/msg  that peak divided by the message size (aim: a small multiple)
  reps      calls timed per mode, WARN and OFF alternated, best taken; gc off while timing
"""


def print_header() -> None:
    print(LEGEND)
    print(_row([name for name, _ in COLUMNS]))
    print(_row(list(SUBHEADS)))
    print(_row(["-" * width for _, width in COLUMNS]))


def _row(cells: Sequence[str]) -> str:
    return "  ".join(
        cell.ljust(width) if i == 0 else cell.rjust(width)
        for i, (cell, (_, width)) in enumerate(zip(cells, COLUMNS, strict=True))
    )


def _us(seconds: float) -> str:
    micro = seconds * 1e6
    return f"{micro:,.0f}" if micro >= 10_000 else f"{micro:,.1f}"


def format_result(r: Result) -> str:
    return _row(
        [
            r.case.label,
            f"{r.case.recipients:,}",
            f"{r.copies:,}",
            f"{r.message_bytes / KB:,.1f}",
            f"{r.warn_seconds * 1e3:,.2f}",
            _us(r.warn_seconds / r.copies),
            _us(r.off_seconds / r.copies),
            f"{(r.warn_seconds - r.off_seconds) * 1e3:,.2f}",
            f"{r.peak_bytes / MB:,.2f}",
            f"{r.peak_bytes / r.message_bytes:,.2f}",
            f"{r.reps}",
        ]
    )


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / KB  # bytes on macOS, KB elsewhere


def summary(results: Sequence[Result]) -> list[str]:
    """The aims in numbers: marginal per-copy cost, memory ratios, process RSS."""
    lines = ["Marginal cost of one more copy, body check OFF (fewest to most recipients):"]
    for label, _ in SIZES:
        rows = sorted((r for r in results if r.case.label == label), key=lambda r: r.copies)
        if len(rows) >= 2 and rows[-1].copies > rows[0].copies:
            lo, hi = rows[0], rows[-1]
            marginal = (hi.off_seconds - lo.off_seconds) / (hi.copies - lo.copies)
            lines.append(
                f"  {label:<6}  {_us(marginal):>9} us/copy  "
                f"({lo.copies:,} -> {hi.copies:,} copies; aim: well under 1000 us)"
            )
    lines.append("Peak traced memory / message size, largest per size:")
    for label, _ in SIZES:
        rows = [r for r in results if r.case.label == label]
        if rows:
            worst = max(rows, key=lambda r: r.peak_bytes / r.message_bytes)
            lines.append(
                f"  {label:<6}  {worst.peak_bytes / worst.message_bytes:>9.2f} x  "
                f"({worst.peak_bytes / MB:,.2f} MB at {worst.case.recipients:,} recipients)"
            )
    warned = [r for r in results if r.warnings]
    if warned:
        lines.append(f"Cases whose plan carried body-check warnings: {len(warned)}")
    lines.append(f"Process peak RSS (ru_maxrss): {peak_rss_mb():,.1f} MB")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 KB and 100 KB, up to 100 recipients"
    )
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    counts = QUICK_RECIPIENT_COUNTS if args.quick else RECIPIENT_COUNTS
    budget = QUICK_BUDGET_SECONDS if args.quick else BUDGET_SECONDS

    print(
        f"bench_split: Python {platform.python_version()} on {platform.platform()}, "
        f"relay from {Path(relay.__file__).parent}"
    )
    print()
    print_header()
    results = []
    for label, nominal in sizes:
        rng = random.Random(f"bench_split {nominal}")
        header_bytes = len(header_section(b"", "multipart/mixed"))
        body = build_body(nominal, max(nominal - header_bytes, 0), rng)
        for count in counts:
            case = Case(label, nominal, count)
            try:
                result = run_case(case, body, budget)
            except SanityError as exc:
                print(f"SANITY CHECK FAILED: {exc}", file=sys.stderr)
                return 1
            except Rejected as exc:
                print(
                    f"REJECTED: {label} x {count}: {exc.reply} ({exc.reason})",
                    file=sys.stderr,
                )
                return 1
            results.append(result)
            print(format_result(result), flush=True)
    print()
    for line in summary(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
