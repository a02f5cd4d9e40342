"""Fail unless every package that a constraints file pins (``name==version``) is installed at that version.

A job must test what it names: pip may be capped by a machine-wide constraints file, or resolve something else.
Usage: python .ci/check_versions.py CONSTRAINTS_FILE
"""

import importlib.metadata
import re
import sys


def main(path: str) -> int:
    wrong = []
    pins = 0
    for line in open(path):
        found = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if not found:
            continue
        name, wanted = found.groups()
        pins += 1
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = "not installed"
        if have.split("+")[0] != wanted:
            wrong.append(f"{name}: wanted {wanted}, installed {have}")
    if wrong:
        print(f"check_versions: {path}: " + "; ".join(wrong), file=sys.stderr)
        return 1
    print(f"check_versions: {pins} pinned packages installed as {path} names")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
