"""The thermal governor: fewer concurrent generations when the CPU runs hot, none when too hot.

Levels, with hysteresis so a temperature hovering at a limit does not flap:

    normal ──(t ≥ soft)──► throttled ──(t ≥ hard)──► halted
      ▲                        │                        │
      └───(t < soft − hyst)────┴──(t < soft − hyst)─────┘

`throttled` allows a batch of `throttled_slots` sequences (default 1) instead of the
configured number; `halted` admits no new work (the server answers 503 with Retry-After) until
the CPU has cooled below the soft limit minus the hysteresis. The governor pulls one lever: it
calls `on_slots(n)` with the allowed batch size whenever that changes (the server passes
`Engine.set_max_running`, so the engine's admission is the only place that enforces it), and
before the new level is visible to anyone reading it. The temperature comes from a file
given in configuration (which is also how tests drive it), else the hottest
`/sys/class/thermal/thermal_zone*/temp`, else psutil; with no sensor the governor says so and
stays `normal`.
"""

from __future__ import annotations

import glob
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("edgevl.thermal")

Level = Literal["normal", "throttled", "halted", "no_sensor"]


@dataclass(frozen=True)
class ThermalPolicy:
    soft_c: float = 80.0
    hard_c: float = 90.0
    hysteresis_c: float = 5.0
    throttled_slots: int = 1
    poll_s: float = 2.0
    sensor_file: str | None = None  # millidegrees or degrees Celsius, like sysfs


def read_celsius(path: str | Path) -> float:
    raw = float(Path(path).read_text().strip())
    return raw / 1000.0 if raw > 1000 else raw  # sysfs gives millidegrees


def find_sensor(policy: ThermalPolicy) -> str | None:
    if policy.sensor_file:
        return policy.sensor_file
    zones = sorted(glob.glob("/sys/class/thermal/thermal_zone*/temp"))
    return zones[0] if zones else None


class ThermalGovernor:
    def __init__(self, policy: ThermalPolicy, max_slots: int, on_slots: Callable[[int], None] | None = None):
        self.policy = policy
        self.max_slots = max_slots
        self.on_slots = on_slots
        self.sensor = find_sensor(policy)
        self.level: Level = "normal" if self.sensor or self._psutil_temp() is not None else "no_sensor"
        self.temperature_c: float | None = None
        self.transitions = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.level == "no_sensor":
            log.warning("no CPU temperature sensor found: the thermal governor stays idle")

    @staticmethod
    def _psutil_temp() -> float | None:
        try:
            import psutil

            temps = psutil.sensors_temperatures() or {}
        except (AttributeError, OSError, ImportError):
            return None
        values = [e.current for entries in temps.values() for e in entries if e.current]
        return max(values) if values else None

    def read(self) -> float | None:
        if self.sensor:
            zones = [self.sensor] if self.policy.sensor_file else glob.glob("/sys/class/thermal/thermal_zone*/temp")
            values = []
            for z in zones:
                try:
                    values.append(read_celsius(z))
                except (OSError, ValueError):
                    continue
            return max(values) if values else None
        return self._psutil_temp()

    def update(self, t: float | None = None) -> Level:
        """Read (or take) the temperature and move between levels; returns the new level."""
        t = self.read() if t is None else t
        with self._lock:
            if t is None:
                return self.level
            self.temperature_c = t
            old = self.level
            p = self.policy
            if t >= p.hard_c:
                new: Level = "halted"
            elif t >= p.soft_c:
                new = "halted" if old == "halted" else "throttled"
            elif t < p.soft_c - p.hysteresis_c:
                new = "normal"
            else:
                new = old if old != "no_sensor" else "normal"  # inside the hysteresis band: stay
            if new != old:
                self.transitions += 1
                log.warning("thermal governor: %s -> %s at %.1f °C (soft %.0f, hard %.0f, hysteresis %.0f)",
                            old, new, t, p.soft_c, p.hard_c, p.hysteresis_c)
                slots = self._slots(new)
                if self.on_slots is not None and slots != self._slots(old):
                    self.on_slots(slots)  # first: whoever sees the new level finds the lever already pulled
            self.level = new
            return new

    def allowed_slots(self) -> int:
        return self._slots(self.level)

    def _slots(self, level: Level) -> int:
        if level == "halted":
            return 0
        if level == "throttled":
            return max(1, min(self.policy.throttled_slots, self.max_slots))
        return self.max_slots

    def admitting(self) -> bool:
        return self.level != "halted"

    def start(self) -> None:
        if self.level == "no_sensor" or self._thread is not None:
            return
        self.update()

        def loop() -> None:
            while not self._stop.wait(self.policy.poll_s):
                self.update()

        self._thread = threading.Thread(target=loop, name="thermal-governor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def snapshot(self) -> dict:
        return {"level": self.level, "temperature_c": self.temperature_c, "sensor": self.sensor,
                "allowed_slots": self.allowed_slots(), "soft_c": self.policy.soft_c, "hard_c": self.policy.hard_c,
                "hysteresis_c": self.policy.hysteresis_c, "transitions": self.transitions,
                "checked_at": time.time()}
