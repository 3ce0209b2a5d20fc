"""
C{gotunnel certs}: the files it writes parse, chain to the CA, say what TLS
peers check (names, addresses, key usages), have safe modes, are never
replaced without --force; bad usage is one line and exit status 2.
"""

from __future__ import annotations

import io
import ipaddress
import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store
from twisted.internet import ssl
from twisted.trial import unittest

from gotunnel.tls import certs
from tests.support import temporaryDirectory

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)


def readCertificate(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def readKey(path: str):
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def contents(*paths: str) -> list[bytes]:
    files = []
    for path in paths:
        with open(path, "rb") as f:
            files.append(f.read())
    return files


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def extension(certificate: x509.Certificate, kind: type) -> x509.Extension:
    return certificate.extensions.get_extension_for_class(kind)


class CertsTestCase(unittest.TestCase):
    def setUp(self):
        self.out = os.path.join(temporaryDirectory(self), "certs")

    def runCerts(self, *argv: str, now: datetime = NOW) -> tuple[int, str, str]:
        """C{gotunnel certs ARGV}: (exit status, standard output, standard error)."""
        stdout, stderr = io.StringIO(), io.StringIO()
        status = certs.main(list(argv), stdout=stdout, stderr=stderr, now=now)
        return status, stdout.getvalue(), stderr.getvalue()

    def succeed(self, *argv: str, now: datetime = NOW) -> str:
        status, out, err = self.runCerts(*argv, now=now)
        self.assertEqual((status, err), (0, ""), out)
        return out

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def makeCA(self, *argv: str) -> x509.Certificate:
        self.succeed("ca", "--out", self.out, *argv)
        return readCertificate(self.path(certs.CA_CERT))

    def assertLeafKey(self, certificate: x509.Certificate, keyPath: str) -> None:
        key = readKey(keyPath)
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertEqual(key.public_key(), certificate.public_key())

    def assertFileModes(self, certPath: str, keyPath: str) -> None:
        self.assertEqual(mode(certPath), 0o644)
        self.assertEqual(mode(keyPath), 0o600)

    def verifier(self, ca: x509.Certificate) -> PolicyBuilder:
        """cryptography's RFC 5280 / CA-Browser-Forum path validation, trusting only C{ca}."""
        return PolicyBuilder().store(Store([ca])).time(NOW)


class CATests(CertsTestCase):
    def test_caCertificate(self):
        """
        A self-signed CA that may sign leaf certificates only, valid from an
        hour ago for ten years, with its P-256 key beside it.
        """
        output = self.succeed("ca", "--out", self.out)
        ca = readCertificate(self.path(certs.CA_CERT))
        ca.verify_directly_issued_by(ca)
        self.assertEqual(ca.subject.rfc4514_string(), "CN=gotunnel CA")
        constraints = extension(ca, x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertEqual((constraints.value.ca, constraints.value.path_length), (True, 0))
        usage = extension(ca, x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(usage.value.key_cert_sign)
        self.assertTrue(usage.value.crl_sign)
        self.assertFalse(usage.value.digital_signature)
        self.assertEqual(ca.not_valid_before_utc, NOW - timedelta(hours=1))
        self.assertEqual(ca.not_valid_after_utc, NOW + timedelta(days=3650))
        self.assertLeafKey(ca, self.path(certs.CA_KEY))
        self.assertFileModes(self.path(certs.CA_CERT), self.path(certs.CA_KEY))
        self.assertEqual(sorted(os.listdir(self.out)), ["ca.key", "ca.pem"])
        self.assertEqual(mode(self.out), 0o700)
        self.assertEqual(output, f"wrote {self.path('ca.pem')} (valid until 2036-03-01)\n"
                                 f"wrote {self.path('ca.key')} (keep it private)\n")

    def test_nameAndDays(self):
        ca = self.makeCA("--name", "Example Tunnels CA", "--days", "30")
        self.assertEqual(ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
                         "Example Tunnels CA")
        self.assertEqual(ca.not_valid_after_utc, NOW + timedelta(days=30))

    def test_existingDirectoryKept(self):
        """An --out directory that exists keeps its mode."""
        os.mkdir(self.out, 0o755)
        os.chmod(self.out, 0o755)
        self.makeCA()
        self.assertEqual(mode(self.out), 0o755)


class ServerTests(CertsTestCase):
    def setUp(self):
        super().setUp()
        self.ca = self.makeCA()

    def makeServer(self, *argv: str) -> x509.Certificate:
        self.succeed("server", "--out", self.out, *argv)
        return readCertificate(self.path(certs.SERVER_CERT))

    def test_namesAndAddresses(self):
        """
        Every --name and --ip is in the subjectAltName, in order; the first
        name is the common name; the server key usages, and nothing more.
        """
        server = self.makeServer("--name", "Tunnel.Example.com", "--ip", "127.0.0.1",
                                 "-n", "*.example.net", "--ip", "2001:db8::1")
        names = extension(server, x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName),
                         ["tunnel.example.com", "*.example.net"])
        self.assertEqual(names.get_values_for_type(x509.IPAddress),
                         [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("2001:db8::1")])
        self.assertEqual(server.subject.rfc4514_string(), "CN=tunnel.example.com")
        self.assertEqual(server.issuer, self.ca.subject)
        constraints = extension(server, x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertFalse(constraints.value.ca)
        usage = extension(server, x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(usage.value.digital_signature)
        self.assertFalse(usage.value.key_cert_sign)
        self.assertEqual(list(extension(server, x509.ExtendedKeyUsage).value),
                         [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertEqual(
            extension(server, x509.AuthorityKeyIdentifier).value.key_identifier,
            extension(self.ca, x509.SubjectKeyIdentifier).value.digest)
        self.assertEqual(server.not_valid_before_utc, NOW - timedelta(hours=1))
        self.assertEqual(server.not_valid_after_utc, NOW + timedelta(days=825))
        self.assertLeafKey(server, self.path(certs.SERVER_KEY))
        self.assertFileModes(self.path(certs.SERVER_CERT), self.path(certs.SERVER_KEY))

    def test_chainVerifies(self):
        """
        The CA signed it, and path validation trusting only the CA accepts
        it for each of its names and addresses, and for no other name.
        """
        server = self.makeServer("--name", "tunnel.example.com", "--ip", "127.0.0.1")
        server.verify_directly_issued_by(self.ca)
        builder = self.verifier(self.ca)
        for identity in (DNSName("tunnel.example.com"),
                         IPAddress(ipaddress.ip_address("127.0.0.1"))):
            chain = builder.build_server_verifier(identity).verify(server, [])
            self.assertEqual(chain, [server, self.ca])
        for identity in (DNSName("other.example.com"),
                         IPAddress(ipaddress.ip_address("127.0.0.2"))):
            with self.assertRaises(x509.verification.VerificationError):
                builder.build_server_verifier(identity).verify(server, [])
        with self.assertRaises(x509.verification.VerificationError):
            builder.build_client_verifier().verify(server, [])

    def test_loadsInTwisted(self):
        """The pair is what an ssl: endpoint's privateKey= and certKey= read."""
        self.makeServer("--ip", "127.0.0.1")
        certPEM, keyPEM = contents(self.path(certs.SERVER_CERT), self.path(certs.SERVER_KEY))
        pair = ssl.PrivateCertificate.loadPEM(certPEM + b"\n" + keyPEM)
        certificate = x509.load_pem_x509_certificate(certPEM)
        self.assertEqual(pair.original.to_cryptography(), certificate)
        self.assertEqual(pair.privateKey.original.to_cryptography_key().public_key(),
                         certificate.public_key())

    def test_addressOnly(self):
        """With --ip alone, the address is the common name."""
        server = self.makeServer("--ip", "::1")
        self.assertEqual(server.subject.rfc4514_string(), "CN=::1")
        self.assertEqual(extension(server, x509.SubjectAlternativeName).value
                         .get_values_for_type(x509.DNSName), [])

    def test_caFromAnotherDirectory(self):
        """--ca reads the CA from there; --out gets the server's files only."""
        elsewhere = os.path.join(temporaryDirectory(self), "server")
        self.succeed("server", "--out", elsewhere, "--ca", self.out, "--name", "a.example")
        self.assertEqual(sorted(os.listdir(elsewhere)), ["server.key", "server.pem"])
        readCertificate(os.path.join(elsewhere, "server.pem")).verify_directly_issued_by(self.ca)

    def test_endsWithTheCA(self):
        """A certificate never outlives its CA; the output says so."""
        self.succeed("ca", "--out", self.out, "--days", "100", "--force")
        ca = readCertificate(self.path(certs.CA_CERT))
        output = self.succeed("server", "--out", self.out, "--name", "a.example",
                              now=NOW + timedelta(days=1))
        server = readCertificate(self.path(certs.SERVER_CERT))
        self.assertEqual(server.not_valid_after_utc, ca.not_valid_after_utc)
        self.assertIn("ends when the CA does", output)

    def test_noCA(self):
        empty = temporaryDirectory(self)
        status, out, err = self.runCerts("server", "--out", empty, "--name", "a.example")
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err, f"gotunnel certs: error: no CA in {empty}: {empty}/ca.pem does "
                              f"not exist (make one with: gotunnel certs ca --out {empty})\n")
        self.assertEqual(os.listdir(empty), [])

    def test_notACertificate(self):
        with open(self.path(certs.CA_CERT), "w") as f:
            f.write("not a certificate\n")
        status, out, err = self.runCerts("server", "--out", self.out, "--name", "a.example")
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err, f"gotunnel certs: error: {self.path('ca.pem')} is not a PEM "
                              "certificate\n")

    def test_notTheCAKey(self):
        """A ca.key that is not the key of ca.pem is refused."""
        other = temporaryDirectory(self)
        self.succeed("ca", "--out", other)
        os.replace(os.path.join(other, "ca.key"), self.path(certs.CA_KEY))
        status, out, err = self.runCerts("server", "--out", self.out, "--name", "a.example")
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err, f"gotunnel certs: error: {self.path('ca.key')} is not the key "
                              f"of {self.path('ca.pem')}\n")

    def test_leafIsNotACA(self):
        """A server certificate given as the CA is refused."""
        self.makeServer("--name", "a.example")
        fake = temporaryDirectory(self)
        os.replace(self.path("server.pem"), os.path.join(fake, "ca.pem"))
        os.replace(self.path("server.key"), os.path.join(fake, "ca.key"))
        status, out, err = self.runCerts("server", "--out", self.out, "--ca", fake,
                                    "--name", "b.example")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("is not a CA certificate", err)


class ClientTests(CertsTestCase):
    def test_clientCertificate(self):
        """CN and subjectAltName are the client's name; client authentication only."""
        ca = self.makeCA()
        self.succeed("client", "--out", self.out, "--name", "alice")
        certPath, keyPath = self.path("client-alice.pem"), self.path("client-alice.key")
        client = readCertificate(certPath)
        self.assertEqual(client.subject.rfc4514_string(), "CN=alice")
        self.assertEqual(extension(client, x509.SubjectAlternativeName).value
                         .get_values_for_type(x509.DNSName), ["alice"])
        self.assertEqual(list(extension(client, x509.ExtendedKeyUsage).value),
                         [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertFalse(extension(client, x509.BasicConstraints).value.ca)
        self.assertEqual(client.not_valid_after_utc, NOW + timedelta(days=825))
        client.verify_directly_issued_by(ca)
        verified = self.verifier(ca).build_client_verifier().verify(client, [])
        self.assertEqual(verified.chain, [client, ca])
        with self.assertRaises(x509.verification.VerificationError):
            self.verifier(ca).build_server_verifier(DNSName("alice")).verify(client, [])
        self.assertLeafKey(client, keyPath)
        self.assertFileModes(certPath, keyPath)


class FileTests(CertsTestCase):
    """Modes that do not depend on the umask, and no file replaced without --force."""

    def setUmask(self, umask: int) -> None:
        self.addCleanup(os.umask, os.umask(umask))

    def test_modesUnderAnyUmask(self):
        for umask in (0o000, 0o077, 0o022):
            self.setUmask(umask)
            self.succeed("ca", "--out", self.out, "--force")
            self.succeed("client", "--out", self.out, "--name", "bob", "--force")
            self.assertFileModes(self.path("ca.pem"), self.path("ca.key"))
            self.assertFileModes(self.path("client-bob.pem"), self.path("client-bob.key"))

    def test_refuseToReplace(self):
        """Run twice, the second run writes nothing, says which files exist, exits 2."""
        self.makeCA()
        before = contents(self.path("ca.pem"), self.path("ca.key"))
        status, out, err = self.runCerts("ca", "--out", self.out)
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err, f"gotunnel certs: error: {self.path('ca.pem')}, "
                              f"{self.path('ca.key')} already exist; give --force to replace\n")
        self.assertEqual(contents(self.path("ca.pem"), self.path("ca.key")), before)

    def test_refuseWhenEitherExists(self):
        """One of the pair existing is enough: the other is not written either."""
        self.makeCA()
        with open(self.path("server.key"), "w") as f:
            f.write("mine\n")
        status, out, err = self.runCerts("server", "--out", self.out, "--name", "a.example")
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err, f"gotunnel certs: error: {self.path('server.key')} already "
                              "exists; give --force to replace\n")
        self.assertFalse(os.path.exists(self.path("server.pem")))
        with open(self.path("server.key")) as f:
            self.assertEqual(f.read(), "mine\n")

    def test_forceReplaces(self):
        """
        --force writes new files over old ones, with the right modes even if
        the old key was readable by all, and leaves no temporary files.
        """
        first = self.makeCA()
        os.chmod(self.path("ca.key"), 0o644)
        self.succeed("ca", "--out", self.out, "--force")
        second = readCertificate(self.path("ca.pem"))
        self.assertNotEqual(first, second)
        self.assertEqual(readKey(self.path("ca.key")).public_key(), second.public_key())
        self.assertFileModes(self.path("ca.pem"), self.path("ca.key"))
        self.assertEqual(sorted(os.listdir(self.out)), ["ca.key", "ca.pem"])

    def test_cannotWrite(self):
        """An --out that cannot be a directory: one line, exit status 1."""
        blocker = os.path.join(temporaryDirectory(self), "file")
        with open(blocker, "w"):
            pass
        out = os.path.join(blocker, "certs")
        status, stdout, err = self.runCerts("ca", "--out", out)
        self.assertEqual((status, stdout), (1, ""))
        self.assertTrue(err.startswith(f"gotunnel certs: error: cannot create the directory "
                                       f"{out}: "), err)
        self.assertEqual(len(err.splitlines()), 1)


class UsageTests(CertsTestCase):
    """Bad usage: exactly one line on standard error, exit status 2, nothing written."""

    def assertUsageError(self, argv: list[str], mentions: str) -> None:
        status, out, err = self.runCerts(*argv)
        self.assertEqual((status, out), (2, ""), err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("gotunnel certs"), err)
        self.assertIn(": error: ", err)
        self.assertIn(mentions, err)
        self.assertNotIn("Traceback", err)
        self.assertFalse(os.path.exists(self.out))

    def test_noCommand(self):
        self.assertUsageError([], "give a command: ca, server or client")

    def test_unknownCommand(self):
        self.assertUsageError(["root", "--out", self.out], "root")

    def test_unknownOption(self):
        self.assertUsageError(["ca", "--out", self.out, "--bits", "4096"], "--bits")

    def test_extraArgument(self):
        self.assertUsageError(["ca", "--out", self.out, "now"], "'now'")

    def test_noOut(self):
        self.assertUsageError(["ca"], "--out DIR is required")

    def test_badDays(self):
        for days in ("0", "-5", "ten", "36501"):
            self.assertUsageError(["ca", "--out", self.out, "--days", days], repr(days))

    def test_serverWithoutNames(self):
        self.assertUsageError(["server", "--out", self.out], "--name DNSNAME and/or --ip")

    def test_serverBadName(self):
        for name in ("bad name", "-x.example", "a..example", "x" * 64 + ".example", "tünnel.de"):
            self.assertUsageError(["server", "--out", self.out, "--name", name], repr(name))

    def test_serverAddressAsName(self):
        self.assertUsageError(["server", "--out", self.out, "--name", "10.0.0.1"],
                              "give it with --ip")

    def test_serverBadAddress(self):
        for ip in ("1.2.3", "localhost", "::g"):
            self.assertUsageError(["server", "--out", self.out, "--ip", ip], repr(ip))

    def test_clientWithoutName(self):
        self.assertUsageError(["client", "--out", self.out], "--name NAME is required")

    def test_clientBadName(self):
        """A name that would put the files elsewhere, or is not a name at all."""
        for name in ("../alice", "a/b", ".hidden", "", "x" * 65, "al ice"):
            self.assertUsageError(["client", "--out", self.out, "--name", name], repr(name))

    def test_help(self):
        """--help prints the usage and is not an error."""
        for argv, usage in ((["--help"], "Usage: gotunnel certs {ca|server|client}"),
                            (["server", "--help"], "Usage: gotunnel certs server --out DIR")):
            printed = io.StringIO()
            self.patch(sys, "stdout", printed)
            self.assertEqual(certs.main(argv, stderr=io.StringIO()), 0)
            self.assertTrue(printed.getvalue().startswith(usage), printed.getvalue())


class EntryPointTests(unittest.TestCase):
    def test_pythonDashM(self):
        """C{python -m gotunnel certs ...} runs L{certs.main}."""
        out = os.path.join(temporaryDirectory(self), "certs")
        done = subprocess.run([sys.executable, "-m", "gotunnel", "certs", "ca", "--out", out],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(sorted(os.listdir(out)), ["ca.key", "ca.pem"])
