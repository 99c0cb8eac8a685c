"""`aigc doctor`: what this machine is and which kernels each mode runs here (paste it into bug reports)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="show the CPU, its instruction sets and the kernel each mode runs here",
        description="Print the CPU model and ISA flags, torch / oneDNN / numba versions and the instruction set each "
        "compiles for, threads, which kernel each mode (fp32, bf16, int8, int4, w8a8) selects on this machine, the "
        "ISA caps that are set (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, NUMBA_CPU_NAME, ...), and the store and "
        "numba cache paths. Include its output (--json) in bug reports.")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_doctor)


def _doctor(args) -> int:
    from aigckit.text.kernels import cpu

    rep = cpu.report()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    c, t, d, n = rep["cpu"], rep["torch"], rep["onednn"], rep["numba"]
    lines = [
        f"aigckit {rep['aigckit']} on Python {rep['python']}",
        f"cpu       {c['model']} ({c['machine']}, {c['cpus']} CPUs), ISA level {c['isa']}",
        f"flags     {' '.join(c['flags']) or '-'}",
        f"torch     {t['version']}, ATen vector code {t['aten_capability']}, {t['threads']} threads",
        f"oneDNN    {d['version']}, ISA {d.get('isa', '?')}, u8 x s8 exact: {d.get('u8s8_exact', '?')}",
        f"numba     {n['version']} ({'on' if n['enabled'] else 'off'}), cpu {n.get('cpu_name', '-')}, "
        f"features {n.get('cpu_features', '-')}, vector code {n.get('vector_code', '-')}, "
        f"{n.get('threads', '-')} threads ({n.get('threading_layer', '-')})",
        "kernels:",
        *(f"  {mode:<5} {what}" for mode, what in rep["kernels"].items()),
        f"caps      {' '.join(f'{k}={v}' for k, v in rep['caps'].items()) or '(none set)'}",
        f"store     {rep['store']}",
        f"numba cache {n.get('cache_dir', '-')}",
    ]
    print("\n".join(lines))
    return 0
