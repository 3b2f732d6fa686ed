"""Settings: the config file, and what each setting is, for the CLI's ``default_map``.

Precedence is flag > environment > config file > default. Click does the first, second
and fourth by itself (``envvar=`` on each option); this module reads the file and
turns it into ``ctx.default_map``, validating every value so a typo in the file is
reported with the file's name instead of as a confusing option error.

The file is TOML, at ``--config``, or ``$AUDITCTL_CONFIG``, or
``$XDG_CONFIG_HOME/auditctl/config.toml`` (``~/.config/auditctl/config.toml``)::

    database_url = "postgresql://auditctl@db.internal/audits"
    stale_after = "10m"
    max_age = "30m"
    stall_after = "10m"
    interval = "5m"
    max_attempts = 3

    [kinds.full-scan]          # thresholds for audits created with kind="full-scan"
    max_age = "4h"
    stall_after = "30m"
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

from .errors import ConfigError
from .thresholds import Overrides, kind_name, parse_duration


@dataclass(frozen=True)
class Setting:
    name: str
    envvar: str
    help: str
    kind: str  # "url", "duration", "count", "urls"


SETTINGS = {
    s.name: s
    for s in (
        Setting("database_url", "AUDITCTL_DATABASE_URL", "database URL (sqlite:///PATH or postgresql://...)", "url"),
        Setting("stale_after", "AUDITCTL_STALE_AFTER", "no heartbeat for this long: stale_heartbeat", "duration"),
        Setting("max_age", "AUDITCTL_MAX_AGE", "running longer than this: max_age_exceeded", "duration"),
        Setting("stall_after", "AUDITCTL_STALL_AFTER", "no progress for this long: progress_stalled", "duration"),
        Setting("interval", "AUDITCTL_INTERVAL", "time between watch's monitor passes", "duration"),
        Setting("refresh", "AUDITCTL_REFRESH", "time between watch's reads of the fleet between passes (screen and log)", "duration"),
        Setting("max_attempts", "AUDITCTL_MAX_ATTEMPTS", "claims before a requeued audit fails for good", "count"),
        Setting("max_resets", "AUDITCTL_MAX_RESETS", "resets of one audit before reset-all leaves it alone", "count0"),
        Setting("lock_wait", "AUDITCTL_LOCK_WAIT", "longest an operation waits for a database lock", "duration"),
        Setting("slack_webhook", "AUDITCTL_SLACK_WEBHOOK", "Slack incoming-webhook URLs (comma-separated)", "urls"),
        Setting("discord_webhook", "AUDITCTL_DISCORD_WEBHOOK", "Discord webhook URLs (comma-separated)", "urls"),
        Setting("webhook", "AUDITCTL_WEBHOOK", "generic JSON webhook URLs (comma-separated)", "urls"),
        Setting("notify_timeout", "AUDITCTL_NOTIFY_TIMEOUT", "the longest one alert may take to post", "duration"),
    )
}

#: The largest count a setting takes: PostgreSQL's integer column (SQLite's holds more).
MAX_COUNT = 2**31 - 1

#: Keys of the config file that are not single settings.
SECTIONS = ("kinds",)


def default_config_path() -> "Path":
    from pathlib import Path

    base = os.environ.get("XDG_CONFIG_HOME") or ""
    if not os.path.isabs(base):  # the XDG rule: a relative value is ignored, or the file would follow the directory
        base = os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "auditctl" / "config.toml"


def load_config_file(path: str | os.PathLike | None) -> "tuple[dict, Path | None]":
    """Read and validate the config file. ``path`` None means the default location, which may be absent."""
    import tomllib
    from pathlib import Path

    explicit = path is not None
    if explicit and not str(path).strip():
        raise ConfigError("the config file path is empty: give a file, or leave --config and AUDITCTL_CONFIG out")
    target = Path(path) if explicit else default_config_path()
    try:
        present = target.exists()
    except OSError as error:  # a name too long for the file system; a directory that cannot be searched
        if not explicit and isinstance(error, PermissionError):
            # Nobody asked for this one: a HOME this user may not search (a service run as another
            # user, HOME still root's) holds no config of theirs.
            return {}, None
        raise ConfigError(f"cannot read config file {str(target)[:200]}: {error.strerror}") from None
    if not present:
        if explicit:
            raise ConfigError(f"config file {target} does not exist")
        return {}, None
    try:
        data = tomllib.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {target}: {error}") from None
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as error:
        # Besides TOMLDecodeError, tomllib raises ValueError for an integer of more than 4300 digits
        # and RecursionError for arrays nested thousands deep: unreadable files, not crashes.
        raise ConfigError(f"config file {target} is not valid TOML: {error}") from None
    return validate_config(data, target), target


def validate_config(data: dict, target) -> dict:
    """The settings of a parsed config file, each checked; raises ConfigError naming the file and key."""
    if isinstance(data.get("auditctl"), dict):
        # The settings may sit in an [auditctl] table (a file shared with other tools), or at the top.
        beside = sorted(key for key in data if key in SETTINGS or key in SECTIONS)  # other tools' tables stay theirs
        if beside:
            raise ConfigError(f"config file {target}: settings both in [auditctl] and at the top level ({', '.join(beside)}); "
                              "keep them in one place")
        data = data["auditctl"]
    values = {}
    for key, value in data.items():
        if key == "kinds":
            values["kinds"] = _validate_kinds(value, target)
            continue
        setting = SETTINGS.get(key)
        if setting is None:
            raise ConfigError(f"config file {target}: unknown setting {key!r}; known settings: "
                              f"{', '.join(list(SETTINGS) + list(SECTIONS))}")
        values[key] = _validate(setting, value, target)
    return values


def _validate_kinds(value, path) -> dict[str, Overrides]:
    if not isinstance(value, dict):
        raise ConfigError(f"config file {path}: kinds must be a table of [kinds.NAME] sections")
    kinds = {}
    for name, section in value.items():
        kinds[kind_name(name, f"config file {path}: a kind's name in [kinds.NAME]")] = Overrides.from_mapping(
            section, f"config file {path}: kinds.{name}")
    return kinds


def _validate(setting: Setting, value, path):
    where = f"config file {path}: {setting.name}"
    if setting.kind == "url":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where} must be a non-empty string")
        from .values import storable_text

        return storable_text(where, value)  # TOML may hold "\u0000", which no file or server name can
    if setting.kind == "urls":
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) and item.strip() for item in items):
            raise ConfigError(f"{where} must be a URL or a list of URLs")
        from .notify.destinations import check_url

        kind = setting.name.removesuffix("_webhook")
        for item in items:
            for url in filter(None, (part.strip() for part in item.split(","))):
                try:
                    check_url(kind, url)
                except ConfigError as error:
                    raise ConfigError(f"{where}: {error}") from None
        return [item.strip() for item in items]
    if setting.kind == "duration":
        parse_duration(value, where)
        return str(value)
    minimum = 0 if setting.kind == "count0" else 1
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        shown = value if not isinstance(value, int) or abs(value) < 10**30 else f"a number of {len(str(abs(value)))} digits"
        raise ConfigError(f"{where} must be a whole number from {minimum} to {MAX_COUNT}, got {shown!r}")
    return value


def build_default_map(values: dict, commands: dict[str, list[str]]) -> dict:
    """``{command: {param: value}}`` for each setting a command has a parameter of that name for.

    Only settings become option defaults. A section is read where it is used: ``[kinds.NAME]``
    sets thresholds, and must not become the default of the ``--kind`` filter, whose parameter
    is also called ``kinds`` (that once made every command see only audits of the kinds named).
    """
    return {
        name: {param: values[param] for param in params if param in values and param in SETTINGS}
        for name, params in commands.items()
    }
