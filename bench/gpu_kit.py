"""Carry what ``bench/gpu.sh`` needs onto a GPU machine that has no network and takes 64 MiB a call.

The GPU machines lent to this project (bench/README.md, "The GPU path") have Python 3.12 with torch, the
CUDA 13 and cuDNN pip packages, OpenCV, matplotlib and the CPU build of ONNX Runtime — but not
onnxruntime-gpu, rasterio, shapely, boto3, psycopg or SAHI. Nothing can be fetched there, and each call
carries at most 64 MiB, the repository's own files included. So the packages travel prepared, in pieces:

1. **Here, once:** ``.venv/bin/python bench/gpu_kit.py prepare``. It downloads the Python 3.12 wheels
   (onnxruntime-gpu at this environment's version, which is built for CUDA 13; rasterio, shapely, boto3 and
   psycopg[binary] at this environment's versions, with what they need that the device lacks; SAHI and fire
   for ``bench/sahi_compare.py``), installs them for Python 3.12 into a staging folder (pip's
   cross-platform ``--target`` install: nothing is built or run), packs that folder as one xz-compressed
   tar and cuts it into pieces that fit a call beside the working tree. Everything goes to ``.gpukit/``
   (ignored by git), with a manifest of the pieces' SHA-256. It ends by printing the calls to make.
2. **There, one call per piece, back to back:** carry ``.gpukit/manifest.json`` and the piece, run
   ``python3 bench/gpu_kit.py receive``: the piece is checked and kept in ``/tmp/tessera-kit`` — which lasts
   only while the machine stays warm (about 30 s between calls).
3. **The last call:** ``python3 bench/gpu_kit.py unpack`` (every piece checked, the staged folder
   extracted), then ``GPU_SITE=/tmp/tessera-kit/site bash bench/gpu.sh`` (see its header).

``python3 bench/gpu_kit.py plan`` prints the calls again. ``receive`` and ``unpack`` use the standard library
only (they run on the GPU machine's own Python).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / ".gpukit"
DEVICE_DIR = Path("/tmp/tessera-kit")
MANIFEST = "manifest.json"
#: What one device call carries at most (the working tree that travels included).
CALL_LIMIT = 64 * 1024 * 1024
#: Room kept in a call beside the piece and the working tree (the manifest, files added since).
CALL_MARGIN = 2 * 1024 * 1024
#: The GPU machines' Python (KINDS.md of the device tool; bench/README.md "The GPU path").
PYTHON_VERSION = "3.12"
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
#: Distributions the GPU machines' image already has (its package list, 2026-11-17), so left out of the
#: kit: the image's versions are used (numpy among them).
DEVICE_HAS = frozenset(
    {
        "attrs", "certifi", "charset-normalizer", "click", "contourpy", "cycler", "flatbuffers", "fonttools",
        "idna", "kiwisolver", "matplotlib", "ml-dtypes", "mpmath", "numpy", "onnx", "opencv-python-headless",
        "packaging", "pillow", "protobuf", "pyparsing", "python-dateutil", "pyyaml", "requests", "six",
        "sympy", "tqdm", "typing-extensions", "urllib3",
    }
)  # fmt: skip
#: Installed with what they need (less what the device has), at this environment's versions.
WITH_DEPS = ("rasterio", "shapely", "boto3", "psycopg[binary]")
#: Installed alone: SAHI's own requirements are on the device (OpenCV as opencv-python-headless), and
#: onnxruntime-gpu's are too (numpy, protobuf, flatbuffers, packaging, sympy).
ALONE = ("onnxruntime-gpu", "fire", "termcolor")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_dist(path: Path) -> str:
    return _normal(path.name.split("-", 1)[0])


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def travelling_bytes(repo: Path = REPO) -> int:
    """What a device call carries besides its carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    total = 0
    for name in filter(None, listed):
        path = repo / os.fsdecode(name)
        if path.is_file():
            total += path.stat().st_size
    return total


def requirements(sahi_requirements: Path) -> tuple[list[str], list[str]]:
    """The kit's requirements: (installed with their dependencies, installed alone), pinned to this
    environment's versions (SAHI to bench/requirements-sahi.txt's)."""
    from importlib.metadata import PackageNotFoundError, version

    def pinned(spec: str) -> str:
        name = spec.split("[", 1)[0]
        try:
            return f"{spec}=={version(name)}"
        except PackageNotFoundError:
            return spec

    sahi = [
        line.strip() for line in sahi_requirements.read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    return [pinned(s) for s in WITH_DEPS], [pinned(s) for s in ALONE] + sahi


def _device_target() -> list[str]:
    """pip's options for the GPU machines' interpreter: CPython 3.12 on x86-64 Linux, binary wheels only."""
    target = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        target += ["--platform", platform]
    return target


def _pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def download(wheels: Path, with_deps: Sequence[str], alone: Sequence[str]) -> list[Path]:
    """Python 3.12 manylinux wheels of the requirements into ``wheels``; those of distributions the
    device has are removed. The wheels kept."""
    wheels.mkdir(parents=True, exist_ok=True)
    _pip("download", "--quiet", "--dest", str(wheels), *_device_target(), *with_deps)
    _pip("download", "--quiet", "--no-deps", "--dest", str(wheels), *_device_target(), *alone)
    kept = []
    for wheel in sorted(wheels.glob("*.whl")):
        if _wheel_dist(wheel) in DEVICE_HAS:
            wheel.unlink()
        else:
            kept.append(wheel)
    return kept


def stage(wheels: Sequence[Path], site: Path) -> None:
    """The wheels installed for Python 3.12 into ``site`` (no bytecode: this Python's would not be 3.12's)."""
    if site.exists():
        shutil.rmtree(site)
    _pip(
        "install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--target", str(site),
        *_device_target(), *map(str, wheels),
    )  # fmt: skip


def pack(
    site: Path, kit: Path, piece_bytes: int, *, preset: int = 6, notes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``site`` as one xz-compressed tar cut into pieces of at most ``piece_bytes`` in ``kit``, and the
    manifest written beside them (returned): each piece's name, size and SHA-256, and the whole's."""
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be positive, got {piece_bytes}")
    kit.mkdir(parents=True, exist_ok=True)
    for old in kit.glob("part-*"):
        old.unlink()
    whole = kit / "site.tar.xz.partial"
    with lzma.open(whole, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w|") as tar:
        for path in sorted(site.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(site)), recursive=False)
    pieces: list[dict[str, Any]] = []
    with whole.open("rb") as f:
        while block := f.read(piece_bytes):
            name = f"part-{len(pieces):03d}"
            (kit / name).write_bytes(block)
            pieces.append({"name": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    manifest = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bytes": whole.stat().st_size,
        "sha256": sha256_of(whole),
        "pieces": pieces,
        **(notes or {}),
    }
    whole.unlink()
    (kit / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_manifest(kit: Path) -> dict[str, Any]:
    """The kit's manifest; a SystemExit saying what to do when it is missing."""
    path = kit / MANIFEST
    if not path.is_file():
        raise SystemExit(
            f"no {path}: run `bench/gpu_kit.py prepare` here (or carry .gpukit/{MANIFEST} there)"
        )
    manifest: dict[str, Any] = json.loads(path.read_text())
    for piece in manifest.get("pieces", []):
        if not re.fullmatch(r"part-\d{3}", str(piece.get("name"))):
            raise SystemExit(
                f"{path}: a piece named {piece.get('name')!r} (not part-NNN): prepare the kit again"
            )
    return manifest


def receive(kit: Path, dest: Path) -> tuple[list[str], list[str]]:
    """The pieces carried in ``kit`` checked against the manifest and copied to ``dest/parts``. Returns
    (pieces now in ``dest``, pieces still missing there). A piece that does not match its SHA-256 is an
    error (SystemExit) and is not kept."""
    manifest = load_manifest(kit)
    parts = dest / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kit / MANIFEST, dest / MANIFEST)
    for piece in manifest["pieces"]:
        carried = kit / piece["name"]
        if not carried.is_file():
            continue
        if sha256_of(carried) != piece["sha256"]:
            raise SystemExit(f"{carried}: SHA-256 differs from the manifest's; carry it again")
        shutil.copyfile(carried, parts / (piece["name"] + ".partial"))
        (parts / (piece["name"] + ".partial")).rename(parts / piece["name"])
    states = _kept_pieces(manifest, parts)
    have = [name for name, state in states.items() if state == "ok"]
    return have, [name for name in states if name not in have]


def _kept_pieces(manifest: dict[str, Any], parts: Path) -> dict[str, str]:
    """Each piece of ``manifest`` in ``parts``: ``ok``, ``absent`` or ``damaged`` — by its SHA-256, not its
    size: pieces of an older kit left there have the same sizes."""
    states = {}
    for piece in manifest["pieces"]:
        kept = parts / piece["name"]
        if not kept.is_file():
            states[piece["name"]] = "absent"
        else:
            states[piece["name"]] = "ok" if sha256_of(kept) == piece["sha256"] else "damaged"
    return states


class _Joined(io.RawIOBase):
    """The pieces read as one file, in order, hashing as they go (a read-only stream for lzma)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__()
        self._paths = iter(paths)
        self._file: io.BufferedReader | None = None
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            if self._file is None:
                path = next(self._paths, None)
                if path is None:
                    return 0
                self._file = path.open("rb")
            n = self._file.readinto(view)
            if n:
                self.digest.update(view[:n])
                return n
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def _members(tar: tarfile.TarFile, site: Path) -> Iterator[tarfile.TarInfo]:
    root = site.resolve()
    for member in tar:
        target = (site / member.name).resolve()
        if root not in (target, *target.parents) or member.issym() or member.islnk() or member.isdev():
            raise SystemExit(f"the kit holds {member.name!r}, which would land outside {site}: not unpacked")
        yield member


def unpack(dest: Path) -> Path:
    """Every piece in ``dest/parts`` checked, then the staged folder extracted into ``dest/site``
    (returned). Missing or damaged pieces: a SystemExit saying which."""
    manifest = load_manifest(dest)
    parts = dest / "parts"
    states = _kept_pieces(manifest, parts)
    missing = [name for name, state in states.items() if state == "absent"]
    if missing:
        raise SystemExit(
            f"pieces {', '.join(missing)} are not in {parts}: the machine went cold between calls (files "
            "outside the repository last only while it stays warm); receive every piece again, back to back"
        )
    for name, state in states.items():
        if state == "damaged":
            raise SystemExit(f"{parts / name}: SHA-256 differs from the manifest's; carry it again")
    site = dest / "site"
    partial = dest / "site.partial"
    for old in (site, partial):
        if old.exists():
            shutil.rmtree(old)
    partial.mkdir(parents=True)
    joined = _Joined([parts / p["name"] for p in manifest["pieces"]])
    try:
        with (
            io.BufferedReader(joined, 8 << 20) as stream,
            lzma.open(stream, "rb") as xz,
            tarfile.open(fileobj=xz, mode="r|") as tar,
        ):
            # The members are checked first (_members); Python's "data" filter where it has one, as well.
            safe: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for member in _members(tar, partial):
                tar.extract(member, partial, **safe)
        if joined.digest.hexdigest() != manifest["sha256"]:
            raise SystemExit("the joined pieces' SHA-256 differs from the manifest's: prepare the kit again")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(site)
    return site


#: The GPU script's steps for the first run after the unpack: the issue's figures first (pipeline efficiency
#: near-free and with the demo detector, the near-free case against SAHI), within one call's 10 minutes.
FIRST_STEPS = "smi setup imports ort session floor floor-demo sahi-near-free"
#: The rest, in a second call while the machine is still warm.
SECOND_STEPS = "setup pipeline sahi training trainer-device"


def plan_text(manifest: dict[str, Any]) -> str:
    """The device calls that carry the kit over and run the GPU script, one per line: a call per piece,
    the last piece's call also unpacking and running the script's first steps, then a call for the rest."""
    pieces = manifest["pieces"]
    gpu = f'GPU_SITE={DEVICE_DIR}/site OUT="$OUT" REPEAT=2 STEP_TIMEOUT=150'
    lines = [
        f"The kit: {len(pieces)} pieces, {manifest['bytes'] / 2**20:,.1f} MiB in all. Make these device "
        "calls back to back (each within ~30 s of the last, or the machine goes cold and /tmp/tessera-kit "
        "with it):",
    ]
    for i, piece in enumerate(pieces, 1):
        command = "python3 bench/gpu_kit.py receive"
        if i == len(pieces):
            command += f' && python3 bench/gpu_kit.py unpack && {gpu} STEPS="{FIRST_STEPS}" bash bench/gpu.sh'
        lines.append(f'  {i}. carry [".gpukit/{MANIFEST}", ".gpukit/{piece["name"]}"], command: {command}')
    lines.append(f'  {len(pieces) + 1}. command: {gpu} STEPS="{SECOND_STEPS}" bash bench/gpu.sh')
    lines.append(
        "  (timeout_s 600 for the last two; their log comes back as gpu-bench.log under $OUT, each step's "
        "exit status in its summary. QUICK=1 makes every benchmark a smoke run.)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``prepare`` (here), ``receive`` and ``unpack`` (on the GPU machine), ``plan``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download, stage and pack the kit into .gpukit/ (here)")
    prep.add_argument("--kit", type=Path, default=KIT)
    prep.add_argument(
        "--piece-mib", type=float, help="piece size (default: what fits a call beside the tree)"
    )
    prep.add_argument(
        "--work", type=Path, help="where wheels and the staging folder go (default: a temp dir)"
    )
    prep.add_argument("--preset", type=int, default=6, help="xz preset, 0-9 (default 6)")
    for name in ("receive", "unpack", "plan"):
        each = sub.add_parser(name)
        each.add_argument("--kit", type=Path, default=KIT)
        each.add_argument("--dest", type=Path, default=DEVICE_DIR)
    args = p.parse_args(argv)

    if args.command == "prepare":
        tree = travelling_bytes()
        piece = int(args.piece_mib * 2**20) if args.piece_mib else CALL_LIMIT - tree - CALL_MARGIN
        print(
            f"the working tree travels with every call: {tree / 2**20:.1f} MiB; "
            f"pieces of {piece / 2**20:.1f} MiB"
        )
        with tempfile.TemporaryDirectory(prefix="tessera-gpukit-") as scratch:
            work = args.work or Path(scratch)
            with_deps, alone = requirements(REPO / "bench" / "requirements-sahi.txt")
            wheels = download(work / "wheels", with_deps, alone)
            print("wheels:", *(f"{w.name} ({w.stat().st_size / 2**20:.1f} MiB)" for w in wheels), sep="\n  ")
            stage(wheels, work / "site")
            started = time.perf_counter()
            manifest = pack(
                work / "site", args.kit, piece, preset=args.preset, notes={"wheels": [w.name for w in wheels]}
            )
            print(f"packed in {time.perf_counter() - started:.0f} s")
        print(plan_text(manifest))
        return 0
    if args.command == "receive":
        have, missing = receive(args.kit, args.dest)
        print(f"{args.dest}: {len(have)} of {len(have) + len(missing)} pieces", end="")
        print(f"; still to carry: {', '.join(missing)}" if missing else "; all there: run `unpack`")
        return 0
    if args.command == "unpack":
        site = unpack(args.dest)
        print(f"unpacked into {site}: run GPU_SITE={site} bash bench/gpu.sh")
        return 0
    print(plan_text(load_manifest(args.kit)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
