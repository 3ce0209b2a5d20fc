"""
C{python -m gotunnel certs ca|server|client}: a small certificate authority
for TLS between gotunnel clients and a server, so that an operator needs no
openssl recipes.  The certificates are made by L{gotunnel.tls.certmaking};
this is the command line and the files: keys are written 0600 from the
moment they exist; certificates 0644.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import sys
from datetime import datetime, timezone
from typing import Optional, Sequence, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.python import usage

from gotunnel.tls.certmaking import (
    CA_DAYS, LEAF_DAYS, IPAddress, Issued, certificatePEM, keyPEM, makeCA, makeClient,
    makeServer,
)

PROG = "gotunnel certs"

MAX_DAYS = 36500

KEY_MODE = 0o600
CERT_MODE = 0o644
DIRECTORY_MODE = 0o700

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CertsError(Exception):
    """
    A command that cannot be done, in one sentence a person can act on.
    C{status} is the exit status: 2 for a refusal, 1 for a failed write.
    """

    def __init__(self, sentence: str, status: int = 2) -> None:
        super().__init__(sentence)
        self.status = status


def clientFiles(name: str) -> tuple[str, str]:
    """The certificate and key file names of client C{name}."""
    return f"client-{name}.pem", f"client-{name}.key"


def loadCA(directory: str) -> Issued:
    """The CA in C{directory}/ca.pem and ca.key; L{CertsError} if it is missing or unusable."""
    certPath = os.path.join(directory, CA_CERT)
    keyPath = os.path.join(directory, CA_KEY)
    for path in (certPath, keyPath):
        if not os.path.exists(path):
            raise CertsError(f"no CA in {directory}: {path} does not exist "
                             f"(make one with: {PROG} ca --out {directory})")
    try:
        with open(certPath, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
    except OSError as e:
        raise CertsError(f"cannot read {certPath}: {e.strerror or e}") from None
    except ValueError:
        raise CertsError(f"{certPath} is not a PEM certificate") from None
    try:
        with open(keyPath, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise CertsError(f"cannot read {keyPath}: {e.strerror or e}") from None
    except (TypeError, ValueError):
        raise CertsError(f"{keyPath} is not an unencrypted PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CertsError(f"{keyPath} is not an ECDSA or RSA key")
    if key.public_key() != certificate.public_key():
        raise CertsError(f"{keyPath} is not the key of {certPath}")
    try:
        isCA = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        isCA = False
    if not isCA:
        raise CertsError(f"{certPath} is not a CA certificate (no basicConstraints CA:TRUE)")
    return Issued(certificate, key)


def writeFiles(files: Sequence[tuple[str, bytes, int]], force: bool) -> None:
    """
    Write each (path, content, mode), all or none.  Without C{force},
    nothing is written if any path exists; with it, each file is written
    beside the old one and renamed over it.  Every file is created with its
    final mode, never wider.
    """
    if not force:
        existing = [path for path, _, _ in files if os.path.lexists(path)]
        if existing:
            raise CertsError(f"{', '.join(existing)} already "
                             f"{'exists' if len(existing) == 1 else 'exist'}; "
                             f"give --force to replace")
    written: list[tuple[str, str]] = []
    try:
        for path, content, mode in files:
            directory, name = os.path.split(path)
            target = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp") \
                if force else path
            _create(target, content, mode)
            written.append((target, path))
        for target, path in written:
            if target != path:
                try:
                    os.replace(target, path)
                except OSError as e:
                    raise CertsError(f"cannot write {path}: {e.strerror or e}", 1) from None
    except CertsError:
        for target, _ in written:
            if os.path.lexists(target):
                os.unlink(target)
        raise


def _create(path: str, content: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertsError(f"{path} already exists; give --force to replace") from None
    except OSError as e:
        raise CertsError(f"cannot write {path}: {e.strerror or e}", 1) from None
    try:
        with os.fdopen(fd, "wb") as f:
            # The umask can only have narrowed the mode; make it exactly this.
            os.fchmod(f.fileno(), mode)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        os.unlink(path)
        raise CertsError(f"cannot write {path}: {e.strerror or e}", 1) from None


def makeDirectory(path: str) -> None:
    """Create C{path} (0700: it may hold the CA's key) unless it exists."""
    try:
        os.makedirs(path, mode=DIRECTORY_MODE, exist_ok=True)
    except OSError as e:
        raise CertsError(f"cannot create the directory {path}: {e.strerror or e}", 1) from None
    if not os.path.isdir(path):
        raise CertsError(f"{path} is not a directory")


def parseDNSName(text: str) -> str:
    """A DNS name (C{*.} allowed first) in lower case; ValueError otherwise."""
    name = text.lower().rstrip(".")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"--name {text!r} is an IP address; give it with --ip")
    if not (_DNS_NAME.fullmatch(name) and len(name) <= 253):
        raise ValueError(f"--name must be a DNS name like tunnel.example.com "
                         f"(international names in their xn-- form), got {text!r}")
    return name


def parseIP(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"--ip must be an IPv4 or IPv6 address, got {text!r}") from None


def parseDays(text: str, limit: int = MAX_DAYS) -> int:
    if not (text.isdigit() and 1 <= int(text) <= limit):
        raise ValueError(f"--days must be a whole number from 1 to {limit}, got {text!r}")
    return int(text)


def _describe(path: str, issued: Issued) -> str:
    until = issued.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
    return f"wrote {path} (valid until {until})"


class _CommandOptions(usage.Options):
    """What every command takes: where to write, for how long, and whether to replace."""

    defaultDays: int

    optFlags = [["force", "f", "Replace files that already exist."]]
    optParameters = [
        ["out", "o", None, "Directory to write the files in (created, mode 0700, if missing)."],
        ["days", None, None, "Days the certificate is valid."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.docs["days"] = f"Days the certificate is valid (default: {self.defaultDays})."

    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r}")

    def postOptions(self) -> None:
        if not self["out"]:
            raise usage.UsageError("--out DIR is required")
        try:
            self["days"] = parseDays(self["days"]) if self["days"] is not None \
                else self.defaultDays
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def run(self, now: datetime, out: TextIO) -> None:
        raise NotImplementedError()


class CAOptions(_CommandOptions):
    synopsis = "--out DIR [--name NAME] [--days N] [--force]"
    longdesc = (f"Make a certificate authority: DIR/{CA_CERT}, which clients trust, and "
                f"DIR/{CA_KEY}, which signs the other certificates and stays private.")
    defaultDays = CA_DAYS
    optParameters = [["name", "n", "gotunnel CA", "Common name of the CA."]]

    def run(self, now: datetime, out: TextIO) -> None:
        directory = self["out"]
        makeDirectory(directory)
        ca = makeCA(self["name"], now, self["days"])
        certPath, keyPath = os.path.join(directory, CA_CERT), os.path.join(directory, CA_KEY)
        writeFiles([(certPath, certificatePEM(ca.certificate), CERT_MODE),
                    (keyPath, keyPEM(ca.key), KEY_MODE)], self["force"])
        out.write(f"{_describe(certPath, ca)}\nwrote {keyPath} (keep it private)\n")


class _LeafOptions(_CommandOptions):
    defaultDays = LEAF_DAYS
    optParameters = [["ca", None, None,
                      f"Directory holding {CA_CERT} and {CA_KEY} (default: the --out directory)."]]

    def readCA(self) -> Issued:
        return loadCA(self["ca"] or self["out"])

    def write(self, issued: Issued, ca: Issued, certName: str, keyName: str,
              out: TextIO) -> None:
        directory = self["out"]
        makeDirectory(directory)
        certPath, keyPath = os.path.join(directory, certName), os.path.join(directory, keyName)
        writeFiles([(certPath, certificatePEM(issued.certificate), CERT_MODE),
                    (keyPath, keyPEM(issued.key), KEY_MODE)], self["force"])
        out.write(f"{_describe(certPath, issued)}\nwrote {keyPath}\n")
        if issued.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc:
            out.write(f"note: {certPath} ends when the CA does; make a new CA before then\n")


class ServerOptions(_LeafOptions):
    synopsis = "--out DIR --name DNSNAME ... --ip ADDRESS ... [--days N] [--force]"
    longdesc = (f"Make DIR/{SERVER_CERT} and DIR/{SERVER_KEY}, signed by the CA, for every "
                "name and address clients use to reach the server (give --name and --ip "
                "as often as needed).")

    def __init__(self) -> None:
        super().__init__()
        self["name"], self["ip"] = [], []

    def opt_name(self, text: str) -> None:
        """A DNS name of the server (repeatable)."""
        try:
            self["name"].append(parseDNSName(text))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    opt_n = opt_name

    def opt_ip(self, text: str) -> None:
        """An IP address of the server (repeatable)."""
        try:
            self["ip"].append(parseIP(text))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        super().postOptions()
        if not (self["name"] or self["ip"]):
            raise usage.UsageError("give the server's names and addresses: "
                                   "--name DNSNAME and/or --ip ADDRESS")

    def run(self, now: datetime, out: TextIO) -> None:
        ca = self.readCA()
        server = makeServer(ca, self["name"], self["ip"], now, self["days"])
        self.write(server, ca, SERVER_CERT, SERVER_KEY, out)


class ClientOptions(_LeafOptions):
    synopsis = "--out DIR --name NAME [--days N] [--force]"
    longdesc = ("Make DIR/client-NAME.pem and DIR/client-NAME.key, signed by the CA, "
                "for mutual TLS; the certificate names NAME (common name and "
                "subjectAltName).")

    optParameters = [["name", "n", None, "The client's name: letters, digits, '.', '_', '-'."]]

    def postOptions(self) -> None:
        super().postOptions()
        name = self["name"]
        if name is None:
            raise usage.UsageError("--name NAME is required")
        if not _CLIENT_NAME.fullmatch(name):
            raise usage.UsageError(
                "--name must be 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                f"letter or digit, got {name!r}")

    def run(self, now: datetime, out: TextIO) -> None:
        ca = self.readCA()
        client = makeClient(ca, self["name"], now, self["days"])
        self.write(client, ca, *clientFiles(self["name"]), out)


class CertsOptions(usage.Options):
    synopsis = f"Usage: {PROG} {{ca|server|client}} [options]"
    longdesc = ("Make a CA, a server certificate and client certificates for TLS "
                "(ECDSA P-256 keys, PEM files).")

    def getSynopsis(self) -> str:
        # A command's usage line is this one followed by its own synopsis.
        return f"Usage: {PROG}" if self.subCommand else self.synopsis

    subCommands = [
        ["ca", None, CAOptions, f"Make {CA_CERT} and {CA_KEY}."],
        ["server", None, ServerOptions, f"Make {SERVER_CERT} and {SERVER_KEY}."],
        ["client", None, ClientOptions, "Make client-NAME.pem and client-NAME.key."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a command: ca, server or client")


def main(argv: Optional[Sequence[str]] = None, stdout: Optional[TextIO] = None,
         stderr: Optional[TextIO] = None, now: Optional[datetime] = None) -> int:
    """
    Run one command; 0 when its files are written.  Every error is one line
    on standard error: 2 for bad options or a refusal (files exist, no CA),
    1 when a file cannot be written.
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    options = CertsOptions()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
        options.subOptions.run(now or datetime.now(timezone.utc), stdout)
    except SystemExit as e:
        # --help has printed the usage.
        return e.code if isinstance(e.code, int) else 0
    except usage.UsageError as e:
        command = f"{PROG} {options.subCommand}" if options.subCommand else PROG
        stderr.write(f"{command}: error: {e} (see {command} --help)\n")
        return 2
    except CertsError as e:
        stderr.write(f"{PROG}: error: {e}\n")
        return e.status
    return 0
