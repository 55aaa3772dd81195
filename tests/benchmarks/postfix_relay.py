"""Postfix itself as a splitting relay, in a private instance, for the throughput benchmark.

``PostfixRelay(sink_port)`` has the shape of ``bench_throughput.Relay``: it listens on
``127.0.0.1:port`` and relays every message to ``[127.0.0.1]:sink_port`` with one
recipient per delivery transaction, the reference configuration of the benchmark issue
("Postfix as a splitting relay, ``smtp_destination_recipient_limit = 1``, queue on
disk"). ``find_postfix()`` says whether it can run here.

The instance lives in one temporary directory and touches nothing of the system's
Postfix (``/etc/postfix``, ``/var/spool/postfix`` and any running instance)::

    postfix-relay-XXXX/        0755 root   (mkdtemp makes 0700: opened for mail_owner)
      etc/main.cf, master.cf   the private config_directory (written below)
      queue/                   the private queue_directory, laid out as postfix-files says
      data/                    the private data_directory (0700 postfix)
      maillog                  written by postlogd (maillog_file)
      master.out               master's own stdout/stderr (normally empty)

It runs ``$daemon_directory/master -c DIR/etc -s`` directly, in the foreground as a child
of this process (``postfix start-fg`` does the same; master makes itself a session
leader with setsid(), so it must not be started as one), rather than ``postfix -c DIR
start``. With this main.cf ``postfix -c DIR start`` and ``stop`` work too (as root no
``alternate_config_directories`` is needed), but they go through ``postfix-script``
(integrity checks, ``post-install create-missing``) and detach master; in the foreground
master's PID is known for the ``/proc`` accounting, it is master that reaps the daemons
(so their CPU time lands in its ``cutime``), and ``close()`` stops it the way ``postfix
stop`` does: SIGTERM to master, which sends SIGTERM to its process group and exits.
Whatever goes wrong before master has read main.cf, or while it sets up logging, is
reported through syslog only; with no syslog daemon master just exits 1 (a
``maillog_file`` outside ``maillog_file_prefixes`` is one such error: see below). The
queue directories are created here with the owners and modes of ``postfix-files``
instead of ``postfix set-permissions``, which would also reset the ownership of the
installed binaries.

main.cf, and why each setting is not Postfix's default (all else is default: process
limits, concurrency, connection caching, ``in_flow_delay``, fsync of queue files):

``compatibility_level = 3.6``
    the current defaults (``relay_domains`` empty, ``smtputf8_enable = yes``) and no
    backwards-compatibility warnings; ``2`` on a Postfix older than 3.6.
``queue_directory``, ``data_directory``
    the private directories above: the queue is on disk, fsynced as usual.
``mail_owner = postfix``, ``setgid_group = postdrop``
    the installed package's accounts, spelled out (they are the defaults on Debian).
``maillog_file = DIR/maillog``, ``maillog_file_prefixes = DIR``
    logging through the ``postlog`` service (Postfix >= 3.4): there is no syslog
    daemon, and a failed start must be able to show why. A ``maillog_file`` outside
    ``maillog_file_prefixes`` (default ``/var, /dev/stdout``) is fatal to master, which
    then reports that through syslog only: with no syslog daemon it just exits 1.
``myhostname = postfix-relay.bench.invalid``
    a fixed name, so that the banner, the HELO to the sink and the ``Received:`` header
    do not depend on the machine's hostname. (It must not be ``smtp-sink``, the name
    the sink greets with: Postfix's SMTP client defers mail to a server that greets
    with ``$myhostname``, "mail loops back to myself".)
``inet_interfaces = 127.0.0.1``, ``inet_protocols = ipv4``
    loopback only; the smtpd port itself is set on the ``smtp inet`` line of master.cf.
``mynetworks = 127.0.0.0/8``
    the clients allowed to relay (``smtp-source`` on loopback).
``mydestination =`` (empty)
    no local delivery: every domain, ``example.com`` included, is remote.
``relayhost = [127.0.0.1]:SINK``
    everything goes to ``smtp-sink``; the brackets skip the MX lookup. With
    ``relay_domains`` empty every recipient is routed by ``default_transport = smtp``.
``smtp_destination_recipient_limit = 1``
    the splitting: one recipient per delivery, so one SMTP transaction per copy. It is
    the limit of the ``smtp`` transport, the one these recipients take (a relayhost and
    no ``relay_domains``: the maillog shows ``postfix/smtp``, not ``postfix/relay``).
    Checked at the sink: 200 messages to 10 recipients make 2,000 transactions
    (``smtp-sink -c`` ``mesg=``), and 200 without this line.
``smtp_dns_support_level = disabled``, ``smtp_host_lookup = native``
    no DNS lookups in the SMTP client; the next hop is an IP literal anyway. (smtpd
    still looks up the client's name, ``smtpd_peername_lookup``, a default left as
    is: for 127.0.0.1 that is ``/etc/hosts``.)
``smtpd_relay_restrictions = permit_mynetworks, reject``
    relay for loopback clients only, whatever the recipient domain.
``alias_maps =``, ``alias_database =``
    no local delivery, so no ``/etc/aliases`` lookups.

Each delivery is its own destination for the queue manager when the recipient limit is
1, so the per-destination concurrency limit (20) does not bound deliveries: up to
``default_process_limit`` (100) ``smtp`` processes run at once, as in any Postfix with
this setting.

There are no address verification (``reject_unverified_*``), content filters, milters,
header or body checks, TLS or SASL: none is configured, and the defaults have none.
``smtputf8_enable`` stays at its default; ``smtp-sink`` and ``smtp-source`` send ASCII.

master.cf is Postfix's stock set of services with two changes: the ``smtp inet`` line
listens on ``127.0.0.1:PORT`` instead of port 25, and no service is chrooted (Debian's
master.cf chroots most of them into the queue directory, which would need copies of
``/etc`` files there). The services that cannot be used here (pickup for the sendmail
command, local, virtual, lmtp, tlsmgr, verify, the pipe examples) are left out.

What ``cpu_seconds()`` and ``peak_rss_kb()`` count is said in their docstrings.
"""

from __future__ import annotations

import collections
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

POSTCONF_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
LOG_TAIL_LINES = 30

# Queue directories as postfix-files lays them out: (name, owner is mail_owner,
# group is setgid_group, mode). The others belong to root.
QUEUE_DIRS = (
    ("active", True, False, 0o700),
    ("bounce", True, False, 0o700),
    ("corrupt", True, False, 0o700),
    ("defer", True, False, 0o700),
    ("deferred", True, False, 0o700),
    ("flush", True, False, 0o700),
    ("hold", True, False, 0o700),
    ("incoming", True, False, 0o700),
    ("private", True, False, 0o700),
    ("maildrop", True, True, 0o1730),
    ("public", True, True, 0o2710),
    ("pid", False, False, 0o755),
    ("saved", True, False, 0o700),
    ("trace", True, False, 0o700),
)

# Postfix's stock master.cf, without chroot and without the services this instance
# cannot use. {port} is the smtpd port.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{port} inet n -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
  -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass(frozen=True)
class Install:
    master: str  # $daemon_directory/master
    postfix: str  # $command_directory/postfix
    version: tuple[int, int]  # mail_version, major and minor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find_postconf() -> str | None:
    return shutil.which("postconf") or next(
        (f"{d}/postconf" for d in POSTCONF_DIRS if os.access(f"{d}/postconf", os.X_OK)), None
    )


def _install() -> Install | None:
    """The installed Postfix, if it is one this module can run here."""
    postconf = _find_postconf()
    if postconf is None or os.geteuid() != 0:
        return None
    try:
        done = subprocess.run(
            [postconf, "-d", "daemon_directory", "command_directory", "mail_version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
    except (OSError, subprocess.SubprocessError, KeyError):
        return None
    values = dict(line.partition(" = ")[::2] for line in done.stdout.splitlines())
    version = re.match(r"(\d+)\.(\d+)", values.get("mail_version", ""))
    if version is None or not values.get("daemon_directory"):
        return None
    master = f"{values['daemon_directory']}/master"
    postfix = f"{values.get('command_directory') or os.path.dirname(postconf)}/postfix"
    major_minor = (int(version[1]), int(version[2]))
    if major_minor < (3, 4):  # 3.4: maillog_file
        return None
    if not (os.access(master, os.X_OK) and os.access(postfix, os.X_OK)):
        return None
    return Install(master, postfix, major_minor)


def find_postfix() -> str | None:
    """Path of Postfix's ``master`` daemon, or None when this module cannot run Postfix.

    None when Postfix is not installed (no ``postconf``, no ``master`` in its
    ``daemon_directory``), is older than 3.4 (no ``maillog_file``), lacks its
    ``postfix``/``postdrop`` accounts, or when this process is not root (master must
    start as root to drop to ``mail_owner``).
    """
    install = _install()
    return install.master if install is not None else None


def main_cf(install: Install, base: Path, port_sink: int) -> str:
    compatibility = "3.6" if install.version >= (3, 6) else "2"
    return f"""\
compatibility_level = {compatibility}
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = {MAIL_OWNER}
setgid_group = {SETGID_GROUP}
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
myhostname = postfix-relay.bench.invalid
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{port_sink}
smtp_destination_recipient_limit = 1
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_relay_restrictions = permit_mynetworks, reject
"""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3 (state) on of ``/proc/PID/stat``, or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


class PostfixRelay:
    """A private Postfix instance relaying to ``127.0.0.1:upstream_port``, one recipient a copy."""

    def __init__(self, upstream_port: int) -> None:
        install = _install()
        if install is None:
            raise RuntimeError("Postfix >= 3.4 is not installed, or this process is not root")
        self.base = Path(tempfile.mkdtemp(prefix="postfix-relay-"))
        self.port = free_port()
        self.install = install
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self._lay_out(install, upstream_port)
            with (self.base / "master.out").open("wb") as out:
                self.process = subprocess.Popen(
                    [install.master, "-c", str(self.base / "etc"), "-s"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    # No start_new_session: master calls setsid() itself, and a process
                    # that already leads a session cannot ("unable to set session...").
                )
            self._wait_listening()
        except BaseException:
            self.close()
            raise

    def _lay_out(self, install: Install, upstream_port: int) -> None:
        owner = pwd.getpwnam(MAIL_OWNER).pw_uid
        group = grp.getgrnam(SETGID_GROUP).gr_gid
        self.base.chmod(0o755)
        etc = self.base / "etc"
        etc.mkdir(mode=0o755)
        (etc / "main.cf").write_text(main_cf(install, self.base, upstream_port))
        (etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        queue = self.base / "queue"
        queue.mkdir(mode=0o755)
        for name, owned, grouped, mode in QUEUE_DIRS:
            path = queue / name
            path.mkdir()
            os.chown(path, owner if owned else 0, group if grouped else 0)
            path.chmod(mode)  # after chown, which clears the setgid bit
        data = self.base / "data"
        data.mkdir(mode=0o700)
        os.chown(data, owner, -1)

    def _wait_listening(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                status = self.process.returncode
                raise RuntimeError(f"Postfix master exited with status {status}\n{self.log_tail()}")
            if self._greets():
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"Postfix does not greet on port {self.port} after {START_TIMEOUT:.0f} s\n"
            f"{self.log_tail()}"
        )

    def _greets(self) -> bool:
        """Whether smtpd answers with a 220 greeting (master listens before it is sure
        to stay up: a fatal error at the end of its start-up leaves the port bound a
        second, and a connection then is reset)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                stream = sock.makefile("rwb")
                if not stream.readline().startswith(b"220 "):
                    return False
                stream.write(b"QUIT\r\n")
                stream.flush()
                stream.readline()
                return True
        except OSError:
            return False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the instance's maillog and of master's own output.

        When both are empty (master died before its logging was set up, and told only
        syslog why), the output of ``postfix -c DIR check`` instead, which reads the
        same configuration and reports a fatal error on its standard error when that
        is a terminal: it runs with its standard error on a pseudo-terminal.
        """
        parts = []
        for name in ("maillog", "master.out"):
            try:
                with (self.base / name).open("rb") as log:
                    tail = collections.deque(log, maxlen=lines)
            except OSError:
                continue
            if tail:
                parts.append(f"--- {name}\n" + b"".join(tail).decode(errors="replace"))
        return "".join(parts) or f"(no log)\n--- postfix check\n{self._check()}"

    def _check(self) -> str:
        controller, terminal = os.openpty()
        try:
            done = subprocess.run(
                [self.install.postfix, "-c", str(self.base / "etc"), "check"],
                stdin=subprocess.DEVNULL,
                stdout=terminal,
                stderr=terminal,
                timeout=60,
                check=False,
            )
            os.close(terminal)
            terminal = -1
            output = b""
            with contextlib.suppress(OSError):  # EIO once the output is read
                while chunk := os.read(controller, 65536):
                    output += chunk
        except (OSError, subprocess.SubprocessError) as error:
            return f"postfix check failed: {error}"
        finally:
            os.close(controller)
            if terminal >= 0:
                os.close(terminal)
        text = output.decode(errors="replace").replace("\r\n", "\n")
        return f"{text}(postfix check exited with status {done.returncode})"

    def pids(self) -> list[int]:
        """PIDs of the instance's live processes: master's session, zombies left out.

        master makes itself a session leader (setsid) and Postfix's daemons never leave
        its session, so this finds master, every daemon it spawned, and any daemon
        still alive after master exited.
        """
        return list(self._session(zombies=False))

    def _session(self, *, zombies: bool) -> dict[int, list[str]]:
        """``/proc/PID/stat`` fields (from field 3 on) of the processes in master's session."""
        if self.process is None:
            return {}
        found = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            fields = _stat_fields(int(entry.name))
            # Field 6 is the session; a zombie is in state Z.
            if fields is None or int(fields[3]) != self.process.pid:
                continue
            if zombies or fields[0] != "Z":
                found[int(entry.name)] = fields
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the whole instance so far, from ``/proc/PID/stat``.

        The sum over the processes in master's session (see ``pids``: master, qmgr,
        smtpd, cleanup, trivial-rewrite, smtp, postlogd, proxymap, anvil, scache, ...,
        and zombies not yet reaped) of ``utime + stime`` (their own time) and ``cutime +
        cstime`` (the time of their children that have exited and been reaped). All of
        Postfix's daemons are children of master, which reaps them, so the time of the
        daemons that already exited (recycled after ``max_use`` requests or
        ``max_idle`` seconds, or done with a one-shot job) is in master's ``cutime +
        cstime``: everything the instance has run since it started is counted once.
        Two limits: a daemon reaped during the scan of ``/proc`` may be counted twice
        or not at all (the readings the benchmark takes, before and after the load, are
        at quiet times), and kernel work not charged to any process (softirq network
        processing, block-device writeback) is not counted. Logging is: it is
        postlogd's work, a process of the instance. Take a reading before and after the
        load and subtract, as for the relay.
        """
        ticks = 0
        for fields in self._session(zombies=True).values():
            ticks += sum(int(value) for value in fields[11:15])  # fields 14-17
        return ticks / os.sysconf("SC_CLK_TCK")

    def peak_rss_kb(self) -> int:
        """Sum of ``VmHWM`` (peak resident set, KiB) over the instance's live processes.

        Each process's own peak, added up: an upper bound of the instance's peak
        footprint, since the peaks need not coincide and pages shared between processes
        (libraries, the binaries' text) count once per process: with ~150 processes
        running under load (up to 100 ``smtp`` clients, 20 ``smtpd`` and their
        ``cleanup``) the sum is ~1.3 GB while their proportional share (PSS) is far
        smaller. Daemons that have already exited are not counted.
        """
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
                        break
        return total

    def close(self) -> None:
        """Stop the instance as ``postfix stop`` does, wait for it, remove the directory.

        SIGTERM to master, which terminates its process group and exits; any process of
        the instance still alive after that (or after ``STOP_TIMEOUT``) gets SIGKILL.
        """
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            while self.pids():
                time.sleep(0.01)
        shutil.rmtree(self.base, ignore_errors=True)
