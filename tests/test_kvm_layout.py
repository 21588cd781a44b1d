"""The ctypes mirrors of <linux/kvm.h> match the kernel headers on this machine.

hvm speaks to KVM through hand-written ctypes structures (hvm/kvm/structs.py) and
ioctl request numbers and constants (hvm/kvm/api.py). A wrong offset or request
number does not fail loudly: the kernel just reads the wrong bytes. So this test
enumerates the Python side, generates from it a C program that prints the same
facts from <linux/kvm.h>, compiles it with gcc and compares:

* every public class ``kvm_foo`` in structs.py against ``struct kvm_foo``: its
  sizeof, and the offsetof and sizeof of every field. A field whose type is a
  private (``_``-prefixed) ctypes struct or union is recursed into along the C
  member path (``offsetof(struct kvm_run, io.port)``); a member named in
  ``_anonymous_`` (kvm_run's exit union ``u``) adds nothing to that path, like
  C's anonymous union. A field typed with another ``kvm_*`` class is compared by
  offset and size here and checked in full as a struct of its own. Scalars and
  arrays are compared by offset and size only, so a C union or pointer mirrored by
  a same-sized Python scalar or byte array passes (kvm_run.s,
  kvm_dirty_log.dirty_bitmap, kvm_msr_filter_range.bitmap). Flexible array
  members are absent on both sides and add nothing to sizeof.
* every module-level ``KVM*`` integer in api.py and structs.py (ioctl request
  numbers, KVM_EXIT_*, KVM_MEM_*, KVM_MSR_*, ...) and every entry of
  ``api.CAPABILITIES`` against the C macro of the same name.
* every ctypes class in structs.py has a C counterpart: a public one is named
  after the struct it mirrors, a private one is reached from a public one.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from hvm.kvm import api, structs

GCC = shutil.which("gcc")
if GCC is None:
    pytest.skip("gcc not found: cannot compile the <linux/kvm.h> probe", allow_module_level=True)
_probe = subprocess.run(
    [GCC, "-fsyntax-only", "-x", "c", "-"],
    input="#include <linux/kvm.h>\n",
    capture_output=True,
    text=True,
    check=False,
)
if _probe.returncode != 0:
    pytest.skip(
        f"<linux/kvm.h> not usable (install linux-libc-dev): {_probe.stderr.strip()}",
        allow_module_level=True,
    )

RECORD = (ctypes.Structure, ctypes.Union)

@dataclass(frozen=True)
class Check:
    """One fact: a C expression and the value the Python side claims for it."""

    expr: str  # also the name reported on mismatch
    python: int
    macro: bool = False  # expr is a macro name; a missing one is reported, not a gcc error


def _is_record(ftype: type) -> bool:
    return isinstance(ftype, type) and issubclass(ftype, RECORD)


def _struct_checks(cls: type) -> tuple[list[Check], set[type]]:
    """Checks for one public class, and the private classes reached from it."""
    c_type = f"{'union' if issubclass(cls, ctypes.Union) else 'struct'} {cls.__name__}"
    checks = [Check(f"sizeof({c_type})", ctypes.sizeof(cls))]
    reached: set[type] = set()

    def walk(record: type, prefix: str, base: int) -> None:
        anonymous = set(getattr(record, "_anonymous_", ()))
        for name, ftype, *_ in record._fields_:
            offset = base + getattr(record, name).offset
            if name in anonymous:  # C's anonymous union: its members sit in the parent
                reached.add(ftype)
                walk(ftype, prefix, offset)
                continue
            path = prefix + name
            checks.append(Check(f"offsetof({c_type}, {path})", offset))
            checks.append(Check(f"sizeof((({c_type} *)0)->{path})", ctypes.sizeof(ftype)))
            if _is_record(ftype) and ftype.__name__.startswith("_"):
                reached.add(ftype)
                walk(ftype, path + ".", offset)

    walk(cls, "", 0)
    return checks, reached


def _records() -> dict[str, type]:
    """Every ctypes struct/union class defined at module level in structs.py."""
    return {
        name: obj
        for name, obj in vars(structs).items()
        if _is_record(obj) and obj.__module__ == structs.__name__
    }


def _constants() -> dict[str, int]:
    """Every KVM* integer api.py and structs.py define, plus api.CAPABILITIES."""
    found: dict[str, int] = {}
    for module in (structs, api):
        for name, value in vars(module).items():
            if re.fullmatch(r"KVM[A-Z0-9_]*", name) and type(value) is int:
                found[name] = value
    found.update(api.CAPABILITIES)
    return found


PUBLIC = sorted(name for name in _records() if name.startswith("kvm_"))
STRUCT_CHECKS: dict[str, list[Check]] = {}
REACHED: set[type] = set()
for _name in PUBLIC:
    STRUCT_CHECKS[_name], _reached = _struct_checks(_records()[_name])
    REACHED |= _reached
CONSTANT_CHECKS = [Check(name, value, macro=True) for name, value in sorted(_constants().items())]
ALL_CHECKS = [check for checks in STRUCT_CHECKS.values() for check in checks] + CONSTANT_CHECKS


def _c_program(checks: list[Check], broken: set[int]) -> tuple[str, dict[int, int]]:
    """C source printing ``index value`` per check, and which check each line holds."""
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", ""]
    lines.append("int main(void) {")
    owner: dict[int, int] = {}
    for i, check in enumerate(checks):
        if i in broken:
            continue
        if check.macro:
            lines.append(f"#ifdef {check.expr}")
        lines.append(f'    printf("{i} %lld\\n", (long long)({check.expr}));')
        owner[len(lines)] = i  # gcc's line numbers start at 1
        if check.macro:
            lines += ["#else", f'    printf("{i} undefined\\n");', "#endif"]
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines), owner


def _c_values(checks: list[Check], workdir: Path) -> dict[int, int | str]:
    """Each check's value in C: an int, or a sentence saying why there is none.

    A line that does not compile (a field or struct C lacks) is dropped and the
    program rebuilt, so one missing name does not hide every other result.
    """
    values: dict[int, int | str] = {}
    for _attempt in range(5):
        source, owner = _c_program(checks, set(values))
        (workdir / "layout.c").write_text(source)
        build = subprocess.run(
            [GCC, "-std=gnu11", "-o", "layout", "layout.c"],
            cwd=workdir,
            capture_output=True,
            text=True,
            check=False,
        )
        if build.returncode == 0:
            break
        errors = re.findall(r"^layout\.c:(\d+):\d+: error: (.*)$", build.stderr, re.MULTILINE)
        if not errors or any(int(line) not in owner for line, _ in errors):
            pytest.fail(f"gcc could not build the probe:\n{build.stderr}")
        for line, message in errors:
            values.setdefault(owner[int(line)], f"does not compile ({message})")
    else:
        pytest.fail(f"gcc could not build the probe:\n{build.stderr}")
    run = subprocess.run([workdir / "layout"], capture_output=True, text=True, check=True)
    for line in run.stdout.splitlines():
        index, value = line.split()
        values[int(index)] = "not defined" if value == "undefined" else int(value)
    return values


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[Check, int | str]:
    values = _c_values(ALL_CHECKS, tmp_path_factory.mktemp("kvm_layout"))
    return {check: values[i] for i, check in enumerate(ALL_CHECKS)}


def _show(value: int | str) -> str:
    """A value for a message; ioctl request numbers are decoded."""
    if isinstance(value, str) or (value >> 8) & 0xFF != 0xAE:
        return str(value)
    direction = ("none", "write", "read", "read|write")[value >> 30]
    return f"{value:#x} (dir {direction}, nr {value & 0xFF:#x}, size {(value >> 16) & 0x3FFF})"


def _mismatches(checks: list[Check], c_values: dict[Check, int | str]) -> list[str]:
    return [
        f"{check.expr}: C {_show(c_values[check])}, Python {_show(check.python)}"
        for check in checks
        if c_values[check] != check.python
    ]


@pytest.mark.parametrize("name", PUBLIC)
def test_struct_layout(name: str, c_values: dict[Check, int | str]) -> None:
    size = c_values[STRUCT_CHECKS[name][0]]
    assert not isinstance(size, str), f"struct {name} is not in <linux/kvm.h>: sizeof {size}"
    bad = _mismatches(STRUCT_CHECKS[name], c_values)
    assert not bad, f"hvm.kvm.structs.{name} differs from <linux/kvm.h>:\n" + "\n".join(bad)


def test_constants(c_values: dict[Check, int | str]) -> None:
    bad = _mismatches(CONSTANT_CHECKS, c_values)
    assert not bad, "hvm.kvm constants differ from <linux/kvm.h>:\n" + "\n".join(bad)


def test_every_struct_has_a_c_counterpart() -> None:
    bad = []
    for name, cls in sorted(_records().items()):
        if name.startswith("_"):
            if cls not in REACHED:
                bad.append(f"{name}: private helper not reached from any kvm_* struct")
        elif not name.startswith("kvm_"):
            bad.append(f"{name}: no C counterpart (class kvm_foo mirrors struct kvm_foo)")
    assert not bad, "hvm.kvm.structs classes never checked against C:\n" + "\n".join(bad)


def test_enumeration_covers_kvm_run() -> None:
    """The walk reaches into kvm_run's anonymous exit union by C path."""
    exprs = {check.expr for check in STRUCT_CHECKS["kvm_run"]}
    for path in ("io.port", "mmio.data", "msr.index", "internal.suberror", "fail_entry.cpu"):
        assert f"offsetof(struct kvm_run, {path})" in exprs
    assert {"KVM_RUN", "KVM_EXIT_IO", "KVM_CAP_USER_MEMORY"} <= {c.expr for c in CONSTANT_CHECKS}
