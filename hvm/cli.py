"""The hvm command line: thin — it parses, calls the library, prints.

Exit statuses are listed in hvm.errors (2 set-up, 3 guest crash, 124 timeout,
130 interrupted, (v << 1) | 1 for isa-debug-exit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from hvm.boot import ImageFormat
from hvm.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TIMEOUT, HvmError
from hvm.exits import ExitKind

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'128M', '1G', '65536', '64MiB' -> bytes (binary units, as QEMU's -m)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 128M, 1G)")
    unit = m.group(2).lower()
    # A bare number is MiB, as for QEMU's -m.
    return int(m.group(1)) * (_UNITS[unit] if unit else 1 << 20)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvm", description="hvm: a hardware-assisted virtualization lab in Python"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a guest image (default: the bundled 'hello')")
    run.add_argument("image", nargs="?", help="multiboot ELF or flat binary (default: bundled hello)")
    run.add_argument("--engine", default="auto", choices=["auto", "kvm", "model", "trap"],
                     help="execution engine (auto: kvm if /dev/kvm is usable, else model; "
                     "trap: classic trap-and-emulate, no VT-x)")
    run.add_argument(
        "--mem", type=parse_size, default=128 << 20, metavar="SIZE", help="guest RAM (default 128M)"
    )
    run.add_argument("--append", default="", metavar="STR", help="guest command line (multiboot)")
    run.add_argument(
        "--format",
        default="auto",
        choices=[f.value for f in ImageFormat],
        help="image format: auto-detect multiboot, or a flat binary entered in real/long mode",
    )
    run.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS", help="stop the guest after this long"
    )
    run.add_argument("--stats", action="store_true", help="print exits by kind and the kernel's counters")
    run.add_argument("--json", metavar="PATH", help="write the run's result as JSON ('-' for stdout)")
    run.add_argument("--guest", metavar="NAME", help="run a bundled guest by name instead of IMAGE")
    run.add_argument("--trace", action="store_true",
                     help="trap engine: print each trap step by step with its modelled cycles (stderr)")
    run.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                     help="engine-specific option (repeatable; `hvm info engines` lists them), "
                     "e.g. apic=legacy|apicv or paging=shadow on the model engine")

    lab = sub.add_parser("lab", help="the chapter's claims as experiments")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lab_sub.add_parser("list", help="list the experiments")
    lab_run = lab_sub.add_parser("run", help="run one experiment")
    lab_run.add_argument("name", help="experiment name (see: hvm lab list)")
    lab_run.add_argument("--engine", default="both", choices=["kvm", "model", "trap", "both"])
    lab_run.add_argument("--json", metavar="PATH", help="write the rows as JSON ('-' for stdout)")
    lab_run.add_argument("--quick", action="store_true", help="the experiment's small parameters")
    lab_run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter (e.g. --set r=100000)",
    )
    lab_rep = lab_sub.add_parser("report", help="run every experiment and write report.md/.html with plots")
    lab_rep.add_argument("--out", default="lab-out", metavar="DIR")
    lab_rep.add_argument("--engine", default="both", choices=["kvm", "model", "trap", "both"])
    lab_rep.add_argument("--quick", action="store_true", help="every experiment's small parameters")

    info = sub.add_parser("info", help="host capabilities and architectural tables")
    info.add_argument("topic", nargs="?", default="host", choices=["host", "exit-reasons", "vmcs", "guests",
                                                                     "engines"])
    info.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _resolve_image(args: argparse.Namespace) -> tuple[str, str]:
    """(path, display name)."""
    from hvm import guests

    if args.image and args.guest:
        raise HvmError("give either IMAGE or --guest, not both")
    if args.image:
        return args.image, args.image
    name = args.guest or "hello"
    if name not in guests.GUESTS:
        raise HvmError(f"unknown bundled guest {name!r} (choose from: {', '.join(guests.GUESTS)})")
    try:
        return str(guests.image_path(name)), name
    except guests.GuestBuildError as exc:
        raise HvmError(f"cannot build bundled guest {name!r}: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from hvm.engine import parse_engine_options
    from hvm.vmm.machine import Machine, MachineConfig

    path, _ = _resolve_image(args)
    to_stdout_json = args.json == "-"
    console = None
    if to_stdout_json:

        def console(data: bytes) -> None:  # the JSON document owns stdout
            return None

    interactive = sys.stdin.isatty() and not to_stdout_json
    if args.trace and args.engine != "trap":
        raise HvmError("--trace shows the trap engine's traps: use it with --engine trap")
    machine = Machine(
        MachineConfig(
            engine=args.engine, mem_size=args.mem, console=console, input_fd=0 if interactive else None,
            engine_options=parse_engine_options(args.engine, args.engine_option),
        )
    )
    if args.trace:
        machine.engine.trace = lambda text: print(text, file=sys.stderr)
    try:
        fmt = ImageFormat(args.format)
        if fmt in (ImageFormat.REAL, ImageFormat.LONG) and args.append:
            raise HvmError("--append needs a multiboot image (flat binaries get no command line)")
        machine.load(path, fmt, args.append)
        with _terminal(interactive):
            result = machine.run(timeout=args.timeout)
    finally:
        machine.close()
    if result.exit_status == EXIT_TIMEOUT:
        print(f"hvm: timeout after {args.timeout:g} s", file=sys.stderr)
    elif result.crash_state is not None:
        print(f"hvm: {result.reason}", file=sys.stderr)
    if args.stats:
        print_stats(machine, result)
    if args.json:
        doc = result_json(machine, result)
        text = json.dumps(doc, indent=2) + "\n"
        if to_stdout_json:
            sys.stdout.write(text)
        else:
            try:
                Path(args.json).write_text(text)
            except OSError as exc:
                raise HvmError(f"cannot write {args.json}: {exc.strerror}") from None
    return result.exit_status


def result_json(machine, result) -> dict:
    return {
        "engine": result.engine,
        "exit_status": result.exit_status,
        "reason": result.reason,
        "console": result.console.decode("utf-8", "replace"),
        "exits": result.exits,
        "exits_detail": [
            {
                "kind": kind.value,
                "sdm_name": kind.sdm_reason.name if kind.sdm_reason is not None else None,
                "sdm_number": int(kind.sdm_reason) if kind.sdm_reason is not None else None,
                "count": s.count,
                "handler_ns": s.handler_ns,
                "unhandled": s.unhandled,
            }
            for kind, s in machine.ledger.rows()
        ],
        "kvm_stats": result.engine_counters if result.engine == "kvm" else {},
        "engine_counters": result.engine_counters,
        "wall_s": round(result.wall_s, 6),
    }


# The kernel counters worth a glance first (names from the KVM binary stats fd).
KVM_HEADLINE = (
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "irq_window_exits",
    "signal_exits",
    "pf_taken",
    "pf_fixed",
    "pf_emulate",
    "insn_emulation",
    "insn_emulation_fail",
    "irq_injections",
    "tlb_flush",
    "invlpg",
    "hypercalls",
)


def print_stats(machine, result) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(stderr=True)
    table = Table(title=f"VMM exits ({result.engine} engine, {result.wall_s:.3f} s wall)")
    for col in ("kind", "SDM exit reason", "#", "count", "handler µs", "µs/exit", "unhandled"):
        table.add_column(col, justify="left" if col in ("kind", "SDM exit reason") else "right")
    for kind, s in machine.ledger.rows():
        reason = kind.sdm_reason
        table.add_row(
            kind.value,
            reason.name if reason is not None else "—",
            str(int(reason)) if reason is not None else "—",
            f"{s.count:,}",
            f"{s.handler_ns / 1e3:,.1f}",
            f"{s.handler_ns / 1e3 / s.count:.2f}" if s.count else "—",
            f"{s.unhandled:,}",
        )
    out.print(table)
    counters = result.engine_counters
    if counters:
        kvm = result.engine == "kvm"
        title = "KVM kernel counters (binary stats fd)" if kvm else f"{result.engine} engine counters"
        kt = Table(title=title)
        kt.add_column("counter")
        kt.add_column("value", justify="right")
        for name in KVM_HEADLINE if kvm else counters:
            if name in counters:
                kt.add_row(name, f"{counters[name]:,}")
        out.print(kt)


def cmd_info(args: argparse.Namespace) -> int:
    if args.topic in ("exit-reasons", "vmcs"):
        if args.topic == "vmcs":
            from hvm.vtx.vmcs import fields

            table = fields()
        else:
            from hvm.vtx.exit_reasons import ExitReason

            table = {r.name: int(r) for r in ExitReason}
        if args.json:
            print(json.dumps(table, indent=2))
        else:
            width = 6 if args.topic == "vmcs" else 3
            for name, number in table.items():
                print(f"{number:#0{width}x}  {name}" if args.topic == "vmcs" else f"{number:3d}  {name}")
        return 0
    if args.topic == "engines":
        from hvm.engine import ENGINES, available_engines, engine_options

        here = available_engines()
        doc = {name: {"available": name in here, "options": engine_options(name)} for name in ENGINES}
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            for name, entry in doc.items():
                opts = ", ".join(f"{k}={v}" for k, v in entry["options"].items()) or "no options"
                print(f"{name:6s} {'available' if entry['available'] else 'not available':14s} {opts}")
        return 0
    if args.topic == "guests":
        from hvm import guests

        doc = dict(guests.GUESTS)
        print(json.dumps(doc, indent=2) if args.json else "\n".join(f"{k:10s} {v}" for k, v in doc.items()))
        return 0
    from hvm.engine.kvm import open_system

    doc: dict = {
        "kvm": None,
        "exit_kinds": {k.value: (k.sdm_reason.name if k.sdm_reason else None) for k in ExitKind},
    }
    try:
        system = open_system()
    except HvmError as exc:
        doc["kvm"] = {"usable": False, "why": str(exc)}
    else:
        with system:
            doc["kvm"] = {
                "usable": True,
                "vcpu_mmap_size": system.vcpu_mmap_size(),
                "capabilities": system.capabilities(),
            }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        kvm = doc["kvm"]
        print(f"KVM: {'usable' if kvm['usable'] else 'not usable: ' + kvm['why']}")
        for name, value in (kvm.get("capabilities") or {}).items():
            print(f"  {name:36s} {value}")
    return 0


class _terminal:
    """cbreak mode on an interactive terminal so keystrokes reach the guest at once; restored after."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.saved = None

    def __enter__(self):
        if self.active:
            import termios
            import tty

            try:
                self.saved = termios.tcgetattr(sys.stdin.fileno())
                tty.setcbreak(sys.stdin.fileno())
            except termios.error:
                self.saved = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self.saved)


def _params(pairs: list[str], defaults: dict) -> dict:
    from hvm.params import typed_value

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in defaults:
            raise HvmError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(defaults)}")
        default = defaults[key]
        try:
            out[key] = typed_value(value, default)
        except ValueError:
            raise HvmError(f"--set {pair!r}: {value!r} is not a {type(default).__name__}") from None
    return out


class _RichProgress:
    def __init__(self) -> None:
        from rich.progress import Progress

        self.progress = Progress(transient=True, console=_stderr_console())
        self.task = None

    def __enter__(self):
        self.progress.start()
        self.task = self.progress.add_task("lab", total=1)
        return self

    def __call__(self, done: int, total: int, what: str) -> None:
        self.progress.update(self.task, completed=done, total=total, description=what)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _measured(c) -> str:
    """A comparison's measured figure with its unit, or why there is none."""
    if c.measured is None:
        return "not measured"
    value = c.measured
    text = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.3f}".rstrip("0")
    return f"{text} {c.figure.unit}"


def cmd_lab(args: argparse.Namespace) -> int:
    from hvm.lab import EXPERIMENTS, run_experiment

    if args.lab_command == "list":
        for exp in EXPERIMENTS.values():
            print(f"{exp.name:16s} {exp.title}  [engines: {', '.join(exp.engines)}]")
        return 0
    if args.lab_command == "report":
        from hvm.lab.report import build

        out = Path(args.out)
        with _RichProgress() as progress:
            sections = build(out, args.engine, args.quick, progress)
        for sec in sections:
            for c in sec.comparisons:
                print(
                    f"{sec.experiment.name}: {c.figure.label}: chapter {c.figure.value:,} {c.figure.unit}, "
                    f"{c.engine} {_measured(c)}"
                )
        print(f"wrote {out / 'report.md'}, {out / 'report.html'}")
        return 0
    if args.name not in EXPERIMENTS:
        raise HvmError(f"unknown experiment {args.name!r} (see: hvm lab list)")
    exp = EXPERIMENTS[args.name]
    params = {**(exp.quick if args.quick else exp.defaults), **_params(args.set, exp.defaults)}
    try:
        with _RichProgress() as progress:
            rows = run_experiment(args.name, args.engine, params, progress)
    except ValueError as exc:
        raise HvmError(str(exc)) from None
    doc = json.dumps({"experiment": args.name, "params": params, "rows": rows}, indent=2) + "\n"
    if args.json == "-":
        sys.stdout.write(doc)
    else:
        if args.json:
            Path(args.json).write_text(doc)
        for c in exp.compare(rows):
            print(
                f"{c.figure.label}: chapter {c.figure.value:,} {c.figure.unit}; {c.engine}: "
                f"{_measured(c)} — {c.why}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "lab":
            return cmd_lab(args)
        return cmd_info(args)
    except HvmError as exc:
        print(f"hvm: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("hvm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - never a traceback for the user
        if os.environ.get("HVM_DEBUG"):
            raise
        print(
            f"hvm: internal error: {type(exc).__name__}: {exc} (set HVM_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def entry() -> None:
    sys.exit(main() & 0xFF)
