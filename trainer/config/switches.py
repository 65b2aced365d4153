"""Optional sections and their switches: a key of a section that is off is refused, never ignored.

An optional section's keys take effect only while its switch is on (`lora.r` with lora.enabled=true,
`diagnostics.sharpness.interval` with diagnostics.sharpness.enabled=true). Set while it is off, a
key would be silently ignored (lora.* would even train the whole model), so `check_switches`
refuses the first such key in one line naming the switch. "Set" means different from the schema's
default: a group option that spells the defaults out (lora=none) passes. A later optional section
registers with one line in SWITCHED.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from trainer.config.schema import Config, ConfigError


@dataclass(frozen=True)
class Switched:
    """An optional section: the keys under `section` (those starting with `prefix`, the switch aside)
    take effect only while `section.switch` is on (truthy)."""

    section: str  # the section's path in Config: lora, diagnostics.sharpness
    switch: str  # its field that turns the section on
    name: str  # the section in words, for the message
    on: str = "true"  # the value the fix names
    prefix: str = ""  # only the section's fields starting with this (diagnostics.noise_scale_*)
    also: str = ""  # another way to turn it on (a config group option)


SWITCHED = (
    Switched("lora", "enabled", "LoRA", also="lora=default"),
    Switched("diagnostics.sharpness", "enabled", "the sharpness"),
    Switched("diagnostics", "noise_scale", "the noise scale", prefix="noise_scale_"),
    Switched("quant", "qat", "QAT", on="int4"),  # group_size is int4's (under int8, check_run refuses it)
)


def show(value: Any) -> str:
    """A value as the command line writes it (true, null, [a,b])."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def check_switches(cfg: Config) -> None:
    """Raise ConfigError (one line) on the first key of an optional section set while its switch is off."""
    for entry in SWITCHED:
        section = cfg
        for name in entry.section.split("."):
            section = getattr(section, name)
        if getattr(section, entry.switch):
            continue
        default = type(section)()
        for f in fields(section):
            value = getattr(section, f.name)
            if f.name == entry.switch or not f.name.startswith(entry.prefix) or is_dataclass(value):
                continue
            if value != getattr(default, f.name):
                switch, key = f"{entry.section}.{entry.switch}", f"{entry.section}.{f.name}"
                also = f" (or {entry.also})" if entry.also else ""
                raise ConfigError(
                    f"{key} is set but {entry.name} is off ({switch}={show(getattr(section, entry.switch))}): "
                    f"set {switch}={entry.on}{also}, or drop {key}={show(value)}"
                )
