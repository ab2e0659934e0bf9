"""Downloads torchvision's ResNet18 weights and the CIFAR-100 binary release into data/, verified by
checksum. Safe to re-run: a present, verified file is kept; a bad or truncated download is deleted
and reported; nothing half-written is left under its final name.

usage: scripts/fetch [resnet18] [cifar100] [--dest DIR] [--manifest TSV] [--base-url URL]
"""
import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


# How long a digest must be under each check: an empty or short one would accept any file.
DIGEST_LENGTHS = {"md5": (32, 32), "sha256-prefix": (8, 64)}


def read_manifest(path):
    entries = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip() and not line.startswith("#"):
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 5:
                    raise SystemExit(f"error: {path}:{number}: expected 5 tab-separated fields")
                name, url, file, check, digest = fields
                digest = digest.strip().lower()
                if check not in DIGEST_LENGTHS:
                    raise SystemExit(f"error: {path}:{number}: unknown check {check!r}")
                low, high = DIGEST_LENGTHS[check]
                if not (low <= len(digest) <= high) or any(c not in "0123456789abcdef" for c in digest):
                    raise SystemExit(f"error: {path}:{number}: {name}: {check} digest {digest!r} "
                                     f"must be {low}" + (f"-{high}" if high != low else "") + " hex digits")
                entries[name] = dict(url=url, file=file, check=check, digest=digest)
    return entries


def verify(path, entry):
    """(ok, actual digest) under the entry's rule."""
    h = hashlib.md5() if entry["check"] == "md5" else hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    actual = h.hexdigest()
    if entry["check"] == "md5":
        return actual == entry["digest"], actual
    if entry["check"] == "sha256-prefix":
        return actual.startswith(entry["digest"]), actual
    raise SystemExit(f"error: unknown check {entry['check']!r} for {entry['file']}")


def download(url, part):
    with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as out:
        expected = r.headers.get("Content-Length")
        shutil.copyfileobj(r, out, 1 << 20)
    if expected is not None and os.path.getsize(part) != int(expected):
        raise OSError(f"got {os.path.getsize(part)} of {expected} bytes")


def unpack_cifar(archive, dest):
    """cifar-100-binary.tar.gz → dest/cifar-100-binary/ (via a temporary folder)."""
    final = os.path.join(dest, "cifar-100-binary")
    if os.path.isfile(os.path.join(final, "test.bin")):
        return final
    tmp = tempfile.mkdtemp(dir=dest, prefix=".cifar-unpack-")
    try:
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")
        inner = os.path.join(tmp, "cifar-100-binary")
        if not os.path.isfile(os.path.join(inner, "train.bin")):
            raise OSError(f"{archive}: no cifar-100-binary/train.bin inside")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(inner, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def fetch(name, entry, dest, base_url):
    path = os.path.join(dest, entry["file"])
    url = entry["url"] if base_url is None else base_url.rstrip("/") + "/" + entry["file"]
    if os.path.isfile(path):
        ok, actual = verify(path, entry)
        if ok:
            print(f"{path}: present, {entry['check']} verified")
            return path
        print(f"{path}: present but its {entry['check']} is {actual}, expected {entry['digest']}: downloading again")
        os.remove(path)
    part = path + ".part"
    print(f"{name}: downloading {url}")
    try:
        download(url, part)
        ok, actual = verify(part, entry)
        if not ok:
            raise OSError(f"{entry['check']} {actual} does not match the expected {entry['digest']} "
                          "(corrupt or truncated download; deleted)")
        os.replace(part, path)
    except Exception as e:  # noqa: BLE001 - any failure: remove the partial file, report, fail
        if os.path.exists(part):
            os.remove(part)
        raise SystemExit(f"error: {path}: {e}")
    print(f"{path}: downloaded, {entry['check']} verified")
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="what to fetch (default: everything in the manifest)")
    p.add_argument("--dest", default=os.path.join(HERE, "..", "data"))
    p.add_argument("--manifest", default=os.path.join(HERE, "downloads.tsv"))
    p.add_argument("--base-url", help="fetch every file from this folder URL instead (mirrors, tests)")
    a = p.parse_args()
    manifest = read_manifest(a.manifest)
    names = a.names or list(manifest)
    unknown = [n for n in names if n not in manifest]
    if unknown:
        raise SystemExit(f"error: unknown download {unknown[0]!r} (known: {', '.join(manifest)})")
    os.makedirs(a.dest, exist_ok=True)
    for name in names:
        path = fetch(name, manifest[name], a.dest, a.base_url)
        if path.endswith(".tar.gz"):
            print(f"{name}: unpacked into {unpack_cifar(path, a.dest)}")


if __name__ == "__main__":
    sys.exit(main())
