"""Errors the user sees as one line, each with its documented exit status.

=====  =====================================================================
0      the guest halted for good (HLT with interrupts off) or powered off
2      set-up error: bad arguments, no usable /dev/kvm, missing/bad image
3      the guest crashed: triple fault, invalid state, engine internal error
70     internal error of hvm itself (a bug; HVM_DEBUG=1 shows the traceback)
124    the run timed out (--timeout); what the guest printed is kept
130    interrupted by the user (Ctrl-C)
odd    (v << 1) | 1 when the guest wrote v to isa-debug-exit (port 0xf4)
=====  =====================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_SETUP = 2
EXIT_GUEST_CRASH = 3
EXIT_INTERNAL = 70
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


class HvmError(Exception):
    """An error with a one-line message and the process exit status it maps to."""

    status = EXIT_SETUP

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class SetupError(HvmError):
    status = EXIT_SETUP


class ImageError(SetupError):
    """Missing, unreadable or unrecognised guest image."""


class EngineUnavailable(SetupError):
    """The requested engine cannot run on this host (e.g. no /dev/kvm)."""
