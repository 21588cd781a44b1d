"""Boot loaders: they write guest memory and return the entry CPU state, nothing else."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from hvm.boot import flat, multiboot
from hvm.cpu import CpuState
from hvm.errors import ImageError
from hvm.vmm.memory import GuestMemory


class ImageFormat(StrEnum):
    AUTO = "auto"
    MULTIBOOT = "multiboot"
    REAL = "real"  # flat binary entered in 16-bit real mode at 0000:7C00
    LONG = "long"  # flat binary entered in 64-bit mode at 1 MiB


def read_image(path: str | Path) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image not found: {p}") from None
    except IsADirectoryError:
        raise ImageError(f"image is a directory: {p}") from None
    except PermissionError:
        raise ImageError(f"image not readable (permission denied): {p}") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {p}: {exc.strerror}") from None
    if not data:
        raise ImageError(f"image is empty: {p}")
    return data


def load(
    mem: GuestMemory, image: bytes, fmt: ImageFormat = ImageFormat.AUTO, cmdline: bytes = b""
) -> tuple[ImageFormat, CpuState]:
    if fmt is ImageFormat.AUTO:
        if multiboot.find_header(image) is None:
            raise ImageError(
                "unrecognised image: no multiboot header in the first 8 KiB "
                "(for a flat binary pass --format real or --format long)"
            )
        fmt = ImageFormat.MULTIBOOT
    if fmt is ImageFormat.MULTIBOOT:
        return fmt, multiboot.load(mem, image, cmdline)
    if fmt is ImageFormat.REAL:
        return fmt, flat.load_real(mem, image)
    return fmt, flat.load_long(mem, image)
