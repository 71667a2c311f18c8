"""The thermal governor's levels, driven through a temperature file as a sysfs sensor would be."""

from __future__ import annotations

from edgevl.ops.thermal import ThermalGovernor, ThermalPolicy


def test_levels_follow_a_temperature_file_with_hysteresis(tmp_path):
    sensor = tmp_path / "temp"
    sensor.write_text("50000")  # millidegrees, as sysfs
    gov = ThermalGovernor(ThermalPolicy(soft_c=80, hard_c=90, hysteresis_c=5, throttled_slots=1,
                                        sensor_file=str(sensor)), max_slots=4)
    seen = []
    for milli in [50000, 79000, 80000, 85000, 77000, 74900, 91000, 84000, 76000, 74000, 82]:
        sensor.write_text(str(milli))
        seen.append((gov.update(), gov.allowed_slots(), gov.admitting()))
    assert seen == [
        ("normal", 4, True),
        ("normal", 4, True),
        ("throttled", 1, True),   # at the soft limit
        ("throttled", 1, True),
        ("throttled", 1, True),   # 77 °C: inside the hysteresis band, stays throttled
        ("normal", 4, True),      # below 80 - 5
        ("halted", 0, False),     # over the hard limit: no new work
        ("halted", 0, False),     # cooling but still above soft: stays halted
        ("halted", 0, False),     # 76: inside the band, still halted
        ("normal", 4, True),      # below soft - hysteresis: back to normal
        ("throttled", 1, True),   # "82" read as degrees
    ]
    assert gov.transitions == 5
    snap = gov.snapshot()
    assert snap["level"] == "throttled" and snap["temperature_c"] == 82


def test_no_sensor_is_reported_and_harmless(tmp_path):
    gov = ThermalGovernor(ThermalPolicy(sensor_file=None), max_slots=2)
    gov.sensor = None  # as on a machine without thermal zones
    gov.level = "no_sensor"
    assert gov.update() == "no_sensor" and gov.allowed_slots() == 2 and gov.admitting()


def test_unreadable_sensor_keeps_the_last_level(tmp_path):
    sensor = tmp_path / "temp"
    sensor.write_text("95")
    gov = ThermalGovernor(ThermalPolicy(sensor_file=str(sensor)), max_slots=2)
    assert gov.update() == "halted"
    sensor.write_text("garbage")
    assert gov.update() == "halted"
