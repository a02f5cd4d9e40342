"""Summarise a ptxas -v resource report: one line per kernel instantiation and architecture.

Usage: python ptxas_report.py REPORT [--fail-on-spills]. Prints registers, shared memory, stack and spill
bytes per kernel (demangled with c++filt when available); with --fail-on-spills exits 1 if any kernel spills.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse(text: str) -> list[dict]:
    kernels, current = [], None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = {"name": m.group(1), "arch": m.group(2), "stack": 0, "spill_st": 0, "spill_ld": 0,
                       "regs": None, "smem": 0}
            kernels.append(current)
        elif current is not None and (m := PROPS.search(line)):
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
        elif current is not None and (m := USED.search(line)):
            current["regs"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return kernels


def demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt") or not names:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(name: str) -> str:
    name = name.replace("spinal_ops::cuda::", "").replace("(spinal_ops::Activation)", "Act:").replace("(Mma)", "Mma:")
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "f16")


def main(argv: list[str]) -> int:
    text = open(argv[1]).read()
    kernels = parse(text)
    if not kernels:
        print(f"{argv[1]}: no kernel entries found (was the report captured with -Xptxas -v?)")
        return 1
    names = demangle([k["name"] for k in kernels])
    spilling = 0
    for k, name in zip(kernels, names, strict=True):
        spills = k["spill_st"] + k["spill_ld"]
        spilling += spills > 0
        print(f"{k['arch']}  regs {k['regs']:>3}  stack {k['stack']:>4} B  "
              f"spill {k['spill_st']:>3}/{k['spill_ld']:<3} B"
              f"  {'SPILLS  ' if spills else ''}{short(name)}")
    print(f"{len(kernels)} kernel instantiations, {spilling} with register spills")
    if "--fail-on-spills" in argv and spilling:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
