"""Play audio on this machine's sound device by streaming a WAV into a system player (PipeWire, PulseAudio, ALSA
or ffplay), or say clearly why there is none."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from aigckit.errors import AigcError


def _pulse_or_pipewire() -> bool:
    if os.environ.get("PULSE_SERVER"):
        return True
    run = os.environ.get("XDG_RUNTIME_DIR")
    return bool(run) and (Path(run, "pulse", "native").exists() or Path(run, "pipewire-0").exists())


def _alsa_device() -> bool:
    snd = Path("/dev/snd")
    return snd.is_dir() and any(p.name.startswith("pcm") and p.name.endswith("p") for p in snd.iterdir())


def player_command() -> list[str]:
    """The command that plays a WAV from stdin here; AigcError naming what is missing when nothing can."""
    server, alsa = _pulse_or_pipewire(), _alsa_device()
    candidates = []
    if server:
        candidates += [["pw-play", "-"], ["paplay"]]
    if server or alsa:
        candidates += [["aplay", "-q", "-"], ["ffplay", "-nodisp", "-autoexit", "-loglevel", "quiet", "-"]]
    for cmd in candidates:
        if shutil.which(cmd[0]):
            return cmd
    if not (server or alsa):
        raise AigcError("no sound device here (no /dev/snd playback device, no PulseAudio/PipeWire server); "
                        "write a file with --out instead")
    raise AigcError("no audio player found (install alsa-utils, pulseaudio-utils or pipewire); "
                    "write a file with --out instead")


class Player:
    """A running player process; ``write`` WAV bytes to it (a streaming header first), ``close`` waits for it."""

    def __init__(self) -> None:
        self.cmd = player_command()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise AigcError(f"audio player {self.cmd[0]} stopped (exit code {self.proc.poll()})") from e

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # the player already exited: its exit code tells why
                self.proc.stdin.close()
        rc = self.proc.wait()
        if rc != 0:
            raise AigcError(f"audio player {self.cmd[0]} failed (exit code {rc})")
