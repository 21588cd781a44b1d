"""Shared fixtures: KVM and QEMU availability, bundled guest images."""

from __future__ import annotations

import shutil

import pytest

from hvm import guests
from hvm.engine.kvm import kvm_usable

KVM = kvm_usable()
QEMU = shutil.which("qemu-system-x86_64")

needs_kvm = pytest.mark.skipif(not KVM, reason="/dev/kvm is missing or not accessible on this host")
needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 not installed (scripts/setup.sh test)"
)


@pytest.fixture(scope="session")
def guest():
    """guest(name) -> path of the built bundled image."""
    return lambda name: guests.image_path(name)
