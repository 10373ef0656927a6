#!/usr/bin/env python3
"""Check that every message the sink kept is intact: its body (everything
after the first empty line, i.e. after smtp-sink's own X- lines and the
message header, which relays change by adding Received:) has the same
SHA-256 as the body of the reference message, which smtp-source sent straight
into a sink. Prints one JSON object: files, intact, damaged, reference size.
Informational: exit status 0 whenever the files could be read."""

import argparse
import hashlib
import json
import os


def body_digest(path):
    """(sha256 hex, body bytes) of the part after the first empty line, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for line in f:
            if line in (b"\n", b"\r\n"):
                break
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def files(d):
    out = []
    for root, _, names in os.walk(d):
        out.extend(os.path.join(root, n) for n in names)
    return sorted(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True, help="dump dir of the reference run")
    ap.add_argument("--dumps", required=True, help="dump dir of the measured run")
    ap.add_argument("--expect", type=int, required=True, help="messages sent")
    a = ap.parse_args()
    ref = files(a.reference)
    if len(ref) != 1:
        print(json.dumps({"verify_error": f"{len(ref)} reference messages, expected 1"}))
        return
    want, size = body_digest(ref[0])
    got = [body_digest(p)[0] for p in files(a.dumps)]
    intact = sum(1 for g in got if g == want)
    print(json.dumps({
        "verified_files": len(got),
        "intact": intact,
        "damaged": len(got) - intact,
        "missing": max(0, a.expect - len(got)),
        "body_bytes": size,
    }))


if __name__ == "__main__":
    main()
