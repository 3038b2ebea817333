"""Rendering skies with the real Stellarium: one process renders a whole shard, under a timeout per frame.

Stellarium (Debian's package, 0.22) runs under ``xvfb-run`` (a virtual X server; Mesa's software OpenGL
where there is no GPU, ``LIBGL_ALWAYS_SOFTWARE=1``) with a user directory of its own that holds

- a ``config.ini`` that turns off what fetches from the network (the Exoplanets, Novae, Satellites,
  Meteor Showers, Supernovae, Quasars and Pulsars plugins, the start-up location look-up, online search)
  and what adds randomness or clutter to a frame (star twinkle, meteors, landscape fog, the landscape
  itself, labels, cardinal points, the GUI and object info), with the atmosphere as the job says and the
  window at the job's image size;
- a script (SSC) that, per frame, sets the observer (``core.setObserverLocation`` takes **longitude
  first**), the UTC date, the view (``core.moveToAltAzi(alt, az)``, azimuth 0 = north, 90 = east), the
  field of view and projection, waits for the frame to draw, and saves a screenshot named after the
  frame; the script ends with ``core.quitStellarium()`` (0.22 has no ``core.quit()``).

Start-up costs ~10 s, a frame ~0.5 s, so a process renders many frames. The renderer watches the frames
appear: a frame that does not appear within ``frame_timeout_s`` of the previous one (``startup_timeout_s``
for the first), a script error in Stellarium's log, or Stellarium exiting early fails the shard with a
:class:`RenderError` saying why; the process group (Xvfb included) is killed, so a hung Stellarium never
outlives its shard.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC
from pathlib import Path

from services.errors import UserError
from services.sky_generator.job import Camera, Sample

#: Where Stellarium and xvfb-run come from, said in every "not installed" error.
INSTALL_HINT = (
    "install Stellarium and a virtual X server: `bash .ci/system-packages` (apt-get install stellarium xvfb "
    "xauth libgl1-mesa-dri)"
)
#: Stellarium's name for each projection a job may ask for.
PROJECTIONS = {
    "perspective": "ProjectionPerspective",
    "stereographic": "ProjectionStereographic",
}
#: Plugins that download catalogues at start-up, draw extra objects at random, or add GUI panels.
PLUGINS_OFF = (
    "Exoplanets",
    "MeteorShowers",
    "Novae",
    "Satellites",
    "Supernovae",
    "Quasars",
    "Pulsars",
    "Oculars",
    "SolarSystemEditor",
    "FOV",
    "OnlineQueries",
    "RemoteControl",
    "RemoteSync",
    "TelescopeControl",
    "Scenery3d",
)
#: Seconds each frame waits after the view is set, so the screenshot shows the new sky.
SETTLE_S = 0.25
STARTUP_TIMEOUT_S = 90.0
FRAME_TIMEOUT_S = 30.0
#: After the last frame Stellarium is given this long to quit by itself (a quit within ~4 s of its start is
#: ignored), then its process group is stopped; the frames are whole by then (each ends with its IEND).
QUIT_TIMEOUT_S = 2.0


class RenderError(Exception):
    """A shard could not be rendered (Stellarium hung, failed its script or exited early); says why."""


def find_programs() -> tuple[str, str]:
    """The paths of ``stellarium`` and ``xvfb-run``; a UserError naming what to install if one is missing."""
    stellarium, xvfb = shutil.which("stellarium"), shutil.which("xvfb-run")
    missing = [name for name, path in (("stellarium", stellarium), ("xvfb-run", xvfb)) if path is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not found on PATH; {INSTALL_HINT}")
    assert stellarium is not None and xvfb is not None
    return stellarium, xvfb


def stellarium_version() -> str:
    """The installed Stellarium's version (from the package manager), or ``unknown``."""
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "stellarium"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    version = done.stdout.strip()
    return version.split("-")[0] if done.returncode == 0 and version else "unknown"


def config_ini(camera: Camera, *, atmosphere: bool) -> str:
    """Stellarium's ``config.ini`` for ``camera`` (see the module docstring); other keys keep defaults."""
    flag = "true" if atmosphere else "false"
    plugins = "\n".join(f"{name} = false" for name in PLUGINS_OFF)
    return f"""[main]
version = 0.22.2
screenshot_format = png
invert_screenshots_colors = false

[video]
fullscreen = false
screen_w = {camera.width}
screen_h = {camera.height}
screen_x = 0
screen_y = 0
maximum_fps = 10000
minimum_fps = 1
viewport_effect = none

[projection]
type = {PROJECTIONS[camera.projection]}
viewportMask = none
flip_horz = false
flip_vert = false

[plugins_load_at_startup]
{plugins}

[init_location]
location = Greenwich, United Kingdom
landscape_name = zero

[landscape]
flag_landscape = false
flag_fog = false
flag_atmosphere = {flag}
flag_enable_labels = false
flag_enable_illumination_layer = false
atmosphere_fade_duration = 0

[astro]
meteor_zhr = 0
flag_star_name = false
flag_planets_hints = false
flag_nebula = false
flag_nebula_name = false
flag_object_trails = false

[stars]
flag_star_twinkle = false
star_twinkle_amount = 0

[viewing]
flag_cardinal_points = false
flag_constellation_drawing = false
flag_constellation_name = false
flag_constellation_art = false
flag_gravity_labels = false

[gui]
selected_object_info = none
flag_show_cardinal_button = false

[navigation]
auto_move_duration = 0

[search]
flag_search_online = false

[scripts]
flag_script_allow_write_absolute_path = true
"""


def script(frames: Sequence[Sample], screenshot_dir: Path) -> str:
    """The SSC script that renders ``frames`` (one shard: one camera) into ``screenshot_dir`` and quits."""
    camera, atmosphere = _shared(frames)
    lines = [
        "// tessera sky generator: one screenshot per frame, then quit.",
        "core.setGuiVisible(false);",
        "core.setTimeRate(0);",
        f'core.setProjectionMode("{PROJECTIONS[camera.projection]}");',
        f"LandscapeMgr.setFlagAtmosphere({'true' if atmosphere else 'false'});",
        "LandscapeMgr.setFlagLandscape(false);",
        "LandscapeMgr.setFlagFog(false);",
        "StelSkyDrawer.setFlagTwinkle(false);",
        'core.setSelectedObjectInfo("None");',
    ]
    directory = _js(str(screenshot_dir))
    for frame in frames:
        name = frame.file_name
        if ":" in name or not name.endswith(".png"):
            raise ValueError(f"a frame's file name must end in .png and hold no colon: {name!r}")
        when = frame.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        lines += [
            # Longitude first: (longitude, latitude, altitude, duration, name, planet).
            f'core.setObserverLocation({frame.lon:.6f}, {frame.lat:.6f}, 0, 0, "", "Earth");',
            f'core.setDate("{when}", "utc");',
            f"core.moveToAltAzi({camera.altitude:.6f}, {camera.azimuth:.6f}, 0);",
            f"StelMovementMgr.zoomTo({camera.fov:.6f}, 0);",
            f"core.wait({SETTLE_S});",
            f'core.screenshot("{_js(name[: -len(".png")])}", false, "{directory}", true);',
        ]
    lines += ["core.wait(0.2);", "core.quitStellarium();", ""]
    return "\n".join(line for line in lines if line)


def _shared(frames: Sequence[Sample]) -> tuple[Camera, bool]:
    """The camera and atmosphere every frame of a shard shares (ValueError when they differ)."""
    if not frames:
        raise ValueError("a shard needs at least one frame")
    camera, atmosphere = frames[0].camera, frames[0].atmosphere
    if any(f.camera != camera or f.atmosphere != atmosphere for f in frames):
        raise ValueError("the frames of one Stellarium run must share their camera and atmosphere")
    return camera, atmosphere


def _js(text: str) -> str:
    """``text`` safe inside a double-quoted SSC (JavaScript) string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def render(
    frames: Sequence[Sample],
    out_dir: Path,
    *,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    frame_timeout_s: float = FRAME_TIMEOUT_S,
    on_frame: Callable[[Path], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[Path]:
    """Render ``frames`` with one Stellarium process; the PNGs, in ``frames`` order, are in ``out_dir``.

    ``on_frame`` is called with each frame's path as it appears (progress); setting ``cancel`` stops
    Stellarium (a worker draining) with a RenderError. Raises :class:`RenderError`
    when a frame does not appear in time, the script fails or Stellarium exits before the last frame, and
    UserError when Stellarium is not installed. Frames already in ``out_dir`` under the shot names are
    rendered again (overwritten), so a shard rendered twice gives the same files.
    """
    stellarium, xvfb = find_programs()
    camera, atmosphere = _shared(frames)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = [out_dir / frame.file_name for frame in frames]
    for path in expected:
        path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="tessera-stellarium-") as home:
        user_dir = Path(home) / "user"
        (user_dir / "scripts").mkdir(parents=True)
        (user_dir / "config.ini").write_text(config_ini(camera, atmosphere=atmosphere))
        (user_dir / "scripts" / "shard.ssc").write_text(script(frames, out_dir))
        log_path = Path(home) / "stellarium.out"
        screen = f"-screen 0 {camera.width}x{camera.height}x24"
        argv = [
            xvfb,
            "-a",
            "-s",
            screen,
            stellarium,
            "--user-dir",
            str(user_dir),
            "--startup-script",
            "shard.ssc",
            "--full-screen",
            "no",
            "--screenshot-dir",
            str(out_dir),
        ]
        env = {**os.environ, "LIBGL_ALWAYS_SOFTWARE": os.environ.get("LIBGL_ALWAYS_SOFTWARE", "1")}
        env.setdefault("HOME", home)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home, start_new_session=True
            )
            try:
                _watch(
                    process,
                    expected,
                    user_dir / "log.txt",
                    startup_timeout_s,
                    frame_timeout_s,
                    on_frame,
                    cancel,
                )
            except RenderError as error:
                raise RenderError(f"{error}{_tail(user_dir / 'log.txt', log_path)}") from None
            finally:
                _end(process)
    return expected


def _watch(  # noqa: PLR0917 - render's state, passed on
    process: subprocess.Popen[bytes],
    expected: list[Path],
    stellarium_log: Path,
    startup_timeout_s: float,
    frame_timeout_s: float,
    on_frame: Callable[[Path], None] | None,
    cancel: threading.Event | None,
) -> None:
    """Wait for each frame in turn; raise RenderError as soon as one cannot come."""
    deadline = time.monotonic() + startup_timeout_s + frame_timeout_s
    for number, path in enumerate(expected, start=1):
        while not _complete(path, process):
            if cancel is not None and cancel.is_set():
                raise RenderError(f"stopped before frame {number} of {len(expected)}: the worker is stopping")
            if _script_failed(stellarium_log):
                raise RenderError(f"Stellarium's script failed before frame {number} of {len(expected)}")
            if process.poll() is not None and not path.exists():
                status = process.returncode
                raise RenderError(
                    f"Stellarium exited (status {status}) before frame {number} of {len(expected)}"
                )
            if time.monotonic() > deadline:
                waited = startup_timeout_s + frame_timeout_s if number == 1 else frame_timeout_s
                raise RenderError(
                    f"frame {number} of {len(expected)} ({path.name}) did not appear within {waited:g} s; "
                    "Stellarium was killed"
                )
            time.sleep(0.05)
        if on_frame is not None:
            on_frame(path)
        deadline = time.monotonic() + frame_timeout_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=QUIT_TIMEOUT_S)  # the frames are all there; _end kills what did not quit


def _complete(path: Path, process: subprocess.Popen[bytes]) -> bool:
    """Whether the screenshot at ``path`` is whole: a PNG ends with its IEND chunk."""
    try:
        with path.open("rb") as png:
            png.seek(-12, os.SEEK_END)
            return png.read(12)[4:8] == b"IEND"
    except OSError:
        return False


_SCRIPT_ERROR = re.compile(r"script error", re.IGNORECASE)


def _script_failed(stellarium_log: Path) -> bool:
    try:
        return bool(_SCRIPT_ERROR.search(stellarium_log.read_text(errors="replace")))
    except OSError:
        return False


def _end(process: subprocess.Popen[bytes]) -> None:
    """Stop the process group (Stellarium and its Xvfb) if it is still there."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(*logs: Path, lines: int = 8) -> str:
    """The last lines of the logs that say something, for an error message."""
    for log in logs:
        try:
            text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            continue
        hits = [line for line in text if _SCRIPT_ERROR.search(line) or "error" in line.lower()]
        if hits:
            return "; Stellarium said: " + " | ".join(hits[-lines:])[:1500]
    return ""
