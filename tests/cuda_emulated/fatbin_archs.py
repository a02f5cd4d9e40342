"""List the CUDA machine code (cubin) embedded in a shared library and check the architectures.

Usage: python fatbin_archs.py LIB.so --require sm_80 sm_90 --kernel spinal_fwd_kernel --kernel ...
Reads the fatbinary containers (magic 0xBA55ED50) of the file directly, so it needs no CUDA tool; an ELF
entry's header names its SM architecture. Kernel names are looked up in uncompressed images; for compressed
ones (nvcc's default for large fatbins) in the library's host-side kernel registration instead.
Exits 1 unless every required architecture has an ELF entry whose
(uncompressed) image names every required kernel.
"""

from __future__ import annotations

import argparse
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2


def entries(data: bytes):
    """Yield (kind, sm, compressed, payload) for every entry of every fatbinary container in `data`."""
    pos = 0
    magic = struct.pack("<I", FATBIN_MAGIC)
    while (pos := data.find(magic, pos)) >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        p, end = pos + header_size, pos + header_size + fat_size
        while p + 32 <= end:
            kind, _, entry_header, padded = struct.unpack_from("<HHIQ", data, p)
            compressed_size, = struct.unpack_from("<I", data, p + 16)
            sm, = struct.unpack_from("<I", data, p + 28)
            if entry_header == 0 or kind not in (KIND_PTX, KIND_ELF):
                break
            yield kind, sm, compressed_size != 0, data[p + entry_header:p + entry_header + padded]
            p += entry_header + padded
        pos = max(end, pos + 4)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("library")
    ap.add_argument("--require", nargs="+", default=["sm_80", "sm_90"])
    ap.add_argument("--kernel", action="append", default=[])
    args = ap.parse_args(argv)
    data = open(args.library, "rb").read()
    found: dict[str, list[str]] = {}
    for kind, sm, compressed, payload in entries(data):
        if kind != KIND_ELF:
            continue
        names = [k for k in args.kernel if k.encode() in payload]
        tag = f"sm_{sm}"
        state = " (compressed)" if compressed else ""
        print(f"ELF {tag}: {len(payload)} bytes{state}; kernels: {', '.join(names) or '-'}")
        if compressed:
            # A compressed image hides its symbol names; require them in the library's kernel registration.
            names = [k for k in args.kernel if k.encode() in data]
        if set(names) >= set(args.kernel):
            found.setdefault(tag, names)
    missing = [a for a in args.require if a not in found]
    if missing:
        print(f"{args.library}: no machine code with kernels {args.kernel} for {', '.join(missing)}")
        return 1
    kernels = ", ".join(args.kernel) or "any kernel"
    print(f"{args.library}: machine code for {', '.join(args.require)} with {kernels}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
