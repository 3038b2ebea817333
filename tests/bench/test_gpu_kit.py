"""bench/gpu_kit.py: the packages for a GPU machine cut into pieces, carried one call at a time, and put
back together there — checked on a small folder (no downloads), pieces lost, damaged or hostile included."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_kit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_kit", REPO / "bench" / "gpu_kit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_kit"] = module
    spec.loader.exec_module(module)
    return module


kit = load_kit()


def make_site(root: Path) -> dict[str, bytes]:
    """A small installed-packages folder: a library that must stay executable, text, an empty file."""
    rng = __import__("random").Random(7)
    files = {
        "onnxruntime/capi/libprovider.so": bytes(rng.getrandbits(8) for _ in range(300_000)),
        "onnxruntime/__init__.py": b"__version__ = '1.31.1'\n" * 200,
        "rasterio-1.4.4.dist-info/RECORD": b"",
        "sahi/models/base.py": b"class DetectionModel: ...\n",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "onnxruntime/capi/libprovider.so").chmod(0o755)
    return files


def carry(kit_dir: Path, call: Path, names: list[str]) -> Path:
    """What one device call carries: the manifest and the named pieces, in a folder of their own."""
    call.mkdir(parents=True)
    shutil.copy(kit_dir / kit.MANIFEST, call / kit.MANIFEST)
    for name in names:
        shutil.copy(kit_dir / name, call / name)
    return call


def test_pieces_carried_in_two_calls_unpack_to_the_same_folder(tmp_path: Path) -> None:
    files = make_site(tmp_path / "site")
    manifest = kit.pack(tmp_path / "site", tmp_path / "kit", 64 * 1024, preset=0)
    names = [p["name"] for p in manifest["pieces"]]
    assert len(names) >= 4 and all(p["bytes"] <= 64 * 1024 for p in manifest["pieces"])
    assert sum(p["bytes"] for p in manifest["pieces"]) == manifest["bytes"]

    dest = tmp_path / "device"
    have, missing = kit.receive(carry(tmp_path / "kit", tmp_path / "call1", names[:2]), dest)
    assert have == names[:2] and missing == names[2:]
    with pytest.raises(SystemExit, match="went cold"):  # unpacked too early: says what to do
        kit.unpack(dest)
    have, missing = kit.receive(carry(tmp_path / "kit", tmp_path / "call2", names[2:]), dest)
    assert have == names and missing == []

    site = kit.unpack(dest)
    for name, data in files.items():
        assert (site / name).read_bytes() == data, name
    assert os.access(site / "onnxruntime/capi/libprovider.so", os.X_OK)
    assert not (dest / "site.partial").exists()


def test_a_damaged_piece_is_refused_and_not_kept(tmp_path: Path) -> None:
    make_site(tmp_path / "site")
    manifest = kit.pack(tmp_path / "site", tmp_path / "kit", 64 * 1024, preset=0)
    first = manifest["pieces"][0]["name"]
    call = carry(tmp_path / "kit", tmp_path / "call", [first])
    damaged = bytearray((call / first).read_bytes())
    damaged[100] ^= 0xFF
    (call / first).write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match="carry it again"):
        kit.receive(call, tmp_path / "device")
    assert not (tmp_path / "device" / "parts" / first).exists()


def test_a_piece_changed_after_it_was_received_stops_the_unpack(tmp_path: Path) -> None:
    make_site(tmp_path / "site")
    manifest = kit.pack(tmp_path / "site", tmp_path / "kit", 64 * 1024, preset=0)
    names = [p["name"] for p in manifest["pieces"]]
    dest = tmp_path / "device"
    kit.receive(carry(tmp_path / "kit", tmp_path / "call", names), dest)
    kept = dest / "parts" / names[-1]
    kept.write_bytes(kept.read_bytes()[:-1] + b"\0")
    with pytest.raises(SystemExit, match="SHA-256 differs"):
        kit.unpack(dest)
    assert not (dest / "site").exists()


def hostile_kit(kit_dir: Path, member: str, link: str | None = None, kind: bytes = tarfile.REGTYPE) -> None:
    """A kit of one piece whose tar holds ``member``: a path that climbs out of the folder, or a link
    (``kind``) to ``link`` followed by a file written through it."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = b"#!/bin/sh\necho owned\n"
        if link is not None:
            linked = tarfile.TarInfo(member)
            linked.type, linked.linkname = kind, link
            tar.addfile(linked)
            member = f"{member}/escaped.sh"
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    packed = lzma.compress(raw.getvalue(), preset=0)
    kit_dir.mkdir(parents=True)
    (kit_dir / "part-000").write_bytes(packed)
    digest = hashlib.sha256(packed).hexdigest()
    piece = {"name": "part-000", "bytes": len(packed), "sha256": digest}
    manifest = {"format": 1, "bytes": len(packed), "sha256": digest, "pieces": [piece]}
    (kit_dir / kit.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("member", ["../escaped.sh", "/tmp/absolute.sh", "a/../../escaped.sh"])
def test_a_member_outside_the_folder_is_not_unpacked(tmp_path: Path, member: str) -> None:
    hostile_kit(tmp_path / "kit", member)
    dest = tmp_path / "device"
    kit.receive(tmp_path / "kit", dest)
    with pytest.raises(SystemExit, match="outside"):
        kit.unpack(dest)
    # The folder being unpacked is dest/site.partial: one level up is dest itself.
    assert not (dest / "escaped.sh").exists() and not Path("/tmp/absolute.sh").exists()
    assert not (dest / "site").exists() and not (dest / "site.partial").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_a_link_in_the_kit_is_not_unpacked(tmp_path: Path, kind: bytes) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile_kit(tmp_path / "kit", "lib", link=str(outside), kind=kind)
    dest = tmp_path / "device"
    kit.receive(tmp_path / "kit", dest)
    with pytest.raises(SystemExit, match="outside"):
        kit.unpack(dest)
    assert list(outside.iterdir()) == [] and not (dest / "site.partial").exists()


def test_pieces_of_an_older_kit_left_on_the_machine_do_not_count(tmp_path: Path) -> None:
    """Pieces of the same size from an earlier kit are not taken for this one's."""
    make_site(tmp_path / "site")
    old = kit.pack(tmp_path / "site", tmp_path / "old", 64 * 1024, preset=0)
    dest = tmp_path / "device"
    kit.receive(carry(tmp_path / "old", tmp_path / "call0", [p["name"] for p in old["pieces"]]), dest)
    # A change near the tar's start (its members go in path order): every piece of the new kit differs.
    (tmp_path / "site" / "onnxruntime" / "__init__.py").write_bytes(b"__version__ = '1.31.2'\n" * 200)
    new = kit.pack(tmp_path / "site", tmp_path / "new", 64 * 1024, preset=0)
    names = [p["name"] for p in new["pieces"]]
    assert [p["bytes"] for p in new["pieces"][:-1]] == [p["bytes"] for p in old["pieces"][:-1]]
    have, missing = kit.receive(carry(tmp_path / "new", tmp_path / "call1", names[-1:]), dest)
    assert have == names[-1:] and missing == names[:-1]


def test_a_manifest_naming_a_path_is_refused(tmp_path: Path) -> None:
    make_site(tmp_path / "site")
    kit.pack(tmp_path / "site", tmp_path / "kit", 64 * 1024, preset=0)
    manifest = json.loads((tmp_path / "kit" / kit.MANIFEST).read_text())
    manifest["pieces"][0]["name"] = "../../etc/passwd"
    (tmp_path / "kit" / kit.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="not part-NNN"):
        kit.receive(tmp_path / "kit", tmp_path / "device")


def test_the_plan_makes_one_call_per_piece_then_runs_the_gpu_script(tmp_path: Path) -> None:
    make_site(tmp_path / "site")
    manifest = kit.pack(tmp_path / "site", tmp_path / "kit", 128 * 1024, preset=0)
    lines = kit.plan_text(manifest).splitlines()
    pieces = [p["name"] for p in manifest["pieces"]]
    calls = [line for line in lines if "gpu_kit.py receive" in line]
    assert len(calls) == len(pieces)
    for call, name in zip(calls, pieces, strict=True):
        assert f'".gpukit/{name}"' in call and '".gpukit/manifest.json"' in call
    # The last piece's call puts the kit together and runs the script's first steps; one more, the rest.
    assert "gpu_kit.py unpack" in calls[-1] and "GPU_SITE=" in calls[-1] and "bench/gpu.sh" in calls[-1]
    assert "gpu_kit.py" not in lines[-2] and "bench/gpu.sh" in lines[-2] and "STEPS=" in lines[-2]
    first = calls[-1].split('STEPS="')[1].split('"')[0].split()
    second = lines[-2].split('STEPS="')[1].split('"')[0].split()
    script = (REPO / "bench" / "gpu.sh").read_text()
    steps = script.split('STEPS="${STEPS:-')[1].split("}")[0].split()
    assert sorted(set(first) | set(second)) == sorted(steps)  # every step of the script, in one call or other


def test_the_device_commands_run_from_the_command_line(tmp_path: Path) -> None:
    """``receive`` and ``unpack`` as the device runs them: stdlib only, a fresh interpreter."""
    make_site(tmp_path / "site")
    kit.pack(tmp_path / "site", tmp_path / "kit", 64 * 1024, preset=0)
    script = str(REPO / "bench" / "gpu_kit.py")
    where = ["--kit", str(tmp_path / "kit"), "--dest", str(tmp_path / "device")]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1"}
    received = subprocess.run(
        [sys.executable, "-I", script, "receive", *where],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert received.returncode == 0, received.stderr
    assert "all there" in received.stdout
    unpacked = subprocess.run(
        [sys.executable, "-I", script, "unpack", *where], capture_output=True, text=True, env=env, check=False
    )
    assert unpacked.returncode == 0, unpacked.stderr
    assert (tmp_path / "device" / "site" / "sahi" / "models" / "base.py").is_file()
