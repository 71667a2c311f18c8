"""The CPU package's energy counter (Linux powercap: RAPL on Intel, also exposed by AMD Zen).

Each package's `/sys/class/powercap/intel-rapl:N/energy_uj` counts microjoules and wraps at its
`max_energy_range_uj`. `EnergyCounter.read()` returns the joules of all packages since its
previous read, the wrap undone. Where no counter can be read it says why (`status`): absent (no
powercap zone, e.g. a VM or a non-x86 board) or not permitted (since 2020 kernels make the files
root-only: CVE-2020-8694) — edgevl then reports n/a, never an estimate.

Reading costs one `pread` per package on a file kept open, so the batch loop reads it after
every model run (runtime/batch.py).
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time

POWERCAP = "/sys/class/powercap"
_PACKAGE = re.compile(r"intel-rapl:\d+$")  # packages; intel-rapl:N:M are their sub-zones (cores, uncore, dram)


class EnergyCounter:
    """Joules from package energy counters. `path`: one counter file named explicitly (its
    max_energy_range_uj beside it, if any); None: every package under /sys/class/powercap."""

    def __init__(self, path: str | None = None):
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._ranges: list[int | None] = []
        self._last: list[int] = []
        self.total_j = 0.0
        if path:
            files = [path]
        else:
            files = sorted(p for p in glob.glob(os.path.join(POWERCAP, "intel-rapl:*", "energy_uj"))
                           if _PACKAGE.search(os.path.dirname(p)))
        if not files:
            self.status = "n/a: absent (no powercap package energy counter on this machine)"
            return
        denied = []
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except PermissionError:
                denied.append(f)
                continue
            except OSError as e:
                self.status = f"n/a: absent ({f}: {e.strerror})"
                self.close()
                return
            self._fds.append(fd)
            self._ranges.append(_read_int(os.path.join(os.path.dirname(f), "max_energy_range_uj")))
        if denied:
            self.close()
            self.status = (f"n/a: not permitted ({denied[0]} is readable by root only; grant read access, "
                           "e.g. a udev rule, to measure energy)")
            return
        try:
            self._last = [self._pread(fd) for fd in self._fds]
        except (OSError, ValueError) as e:
            self.close()
            self.status = f"n/a: not permitted ({type(e).__name__} reading the counter)"
            return
        self.status = "ok: " + ", ".join(files)
        self._t_watts, self._j_watts, self.watts = time.monotonic(), 0.0, float("nan")

    @property
    def available(self) -> bool:
        return bool(self._fds)

    def read(self) -> float | None:
        """Joules since the previous read, all packages (None without a counter)."""
        if not self._fds:
            return None
        with self._lock:
            joules = 0.0
            for i, fd in enumerate(self._fds):
                try:
                    now = self._pread(fd)
                except (OSError, ValueError):
                    continue
                delta = now - self._last[i]
                if delta < 0:  # wrapped; without its range a wrap cannot be undone, so the step counts 0
                    delta = delta + self._ranges[i] if self._ranges[i] else 0
                self._last[i] = now
                joules += delta / 1e6
            self.total_j += joules
            return joules

    def power_w(self) -> float:
        """Mean watts since the previous call (NaN without a counter, or within 0.5 s of it: too short to say)."""
        if not self._fds:
            return float("nan")
        self.read()
        with self._lock:
            now = time.monotonic()
            if now - self._t_watts >= 0.5:
                self.watts = (self.total_j - self._j_watts) / (now - self._t_watts)
                self._t_watts, self._j_watts = now, self.total_j
            return self.watts

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    @staticmethod
    def _pread(fd: int) -> int:
        return int(os.pread(fd, 32, 0).strip())


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
