"""
The open-file limit raised at start-up, in this process (restored after
each test).
"""

import resource

from twisted.trial import unittest

from gotunnel.cli.rlimits import raiseOpenFileLimit


class RaiseOpenFileLimitTests(unittest.TestCase):
    def setUp(self):
        self.original = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, self.original)
        self.hard = self.original[1]

    def lowerSoftLimit(self, soft: int) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, self.hard))

    def test_raisedToWhatIsWanted(self):
        """A soft limit below what is wanted is raised to it, within the hard limit."""
        self.lowerSoftLimit(256)
        wanted = 512 if self.hard == resource.RLIM_INFINITY else min(512, self.hard)
        self.assertEqual(raiseOpenFileLimit(wanted), (256, wanted))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (wanted, self.hard))

    def test_cappedByTheHardLimit(self):
        """Wanting more than the hard limit raises the soft limit to the hard one."""
        if self.hard == resource.RLIM_INFINITY:
            raise unittest.SkipTest("no hard limit on open files here")
        before = min(256, self.hard)
        self.lowerSoftLimit(before)
        self.assertEqual(raiseOpenFileLimit(self.hard + 1000), (before, self.hard))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (self.hard, self.hard))

    def test_neverLowered(self):
        """A soft limit above what is wanted stays as it is."""
        self.lowerSoftLimit(300)
        self.assertEqual(raiseOpenFileLimit(200), (300, 300))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (300, self.hard))
