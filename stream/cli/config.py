"""Settings for the command line: validated, with errors that name what the user typed.

pydantic reports a bad value by field name (`turns_partitions`); the user set
`EVOSTREAM_TURNS_PARTITIONS` or a key in a settings file, so the message names that. A
mistyped `EVOSTREAM_*` variable would otherwise be ignored silently (pydantic-settings reads
only the names it knows), so the environment is checked for near misses first.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Mapping

from pydantic import ValidationError

from stream.cli.errors import CliError, ExitCode

PREFIX = "EVOSTREAM_"

#: EVOSTREAM_* variables that are not settings but are read elsewhere (tooling, tests, chaos
#: runs, the local stack). Prefixes cover families (fault injection, test overrides).
AUXILIARY_VARIABLES = frozenset({
    "EVOSTREAM_CONFIG", "EVOSTREAM_CACHE_DIR", "EVOSTREAM_LOCALSTACK_DIR", "EVOSTREAM_TANSU_BIN",
    "EVOSTREAM_REDIS_SERVER_BIN", "EVOSTREAM_VENV", "EVOSTREAM_PYTHON", "EVOSTREAM_WORKERS",
    "EVOSTREAM_MODEL_DIR", "EVOSTREAM_CHECKPOINT_DIR",  # docker-compose host variables (the model directory)
    "EVOSTREAM_API_KEY",  # the query API key of `evostream query/search` (a client's, not a worker setting; #9)
})
AUXILIARY_PREFIXES = ("EVOSTREAM_FAULT", "EVOSTREAM_CHAOS_", "EVOSTREAM_TEST_", "EVOSTREAM_BENCH_")


def setting_variables() -> dict[str, str]:
    """{EVOSTREAM_NAME: field name} of every setting."""
    from stream.settings import Settings

    return {PREFIX + name.upper(): name for name in Settings.model_fields}


def deprecated_variables() -> dict[str, str]:
    """{old EVOSTREAM_NAME: the setting it stands for} (still read, with a deprecation line)."""
    from stream.settings import DEPRECATED_NAMES

    return {PREFIX + old.upper(): new for old, new in DEPRECATED_NAMES.items()}


def check_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """Raise CliError(USAGE) for an EVOSTREAM_* variable that is close to a setting's name but
    is not one (a typo: it would be ignored); return warnings for other unknown ones."""
    env = os.environ if environ is None else environ
    known = setting_variables()
    old = deprecated_variables()
    warnings: list[str] = []
    for var in sorted(env):
        if (not var.startswith(PREFIX) or var in known or var in old or var in AUXILIARY_VARIABLES
                or var.startswith(AUXILIARY_PREFIXES)):
            continue
        close = difflib.get_close_matches(var, list(known), n=1, cutoff=0.8)
        if close:
            raise CliError(f"unknown variable {var} (did you mean {close[0]}?); `evostream settings --help` lists "
                           "every setting", ExitCode.USAGE)
        warnings.append(f"ignoring {var}: not an evostream setting (`evostream settings --help` lists them)")
    return warnings


#: Settings whose value is never repeated in an error line (secrets).
SECRET_SETTINGS = frozenset({"api_keys", "kafka_sasl_password"})


def _shown(field: str, value: Any) -> str:
    """A setting's value as an error line may show it: secrets hidden, URL passwords redacted."""
    from stream.cli.errors import redact

    if field in SECRET_SETTINGS:
        return "(value not shown)"
    return repr(redact(value)) if isinstance(value, str) and "://" in value else repr(value)


def _describe(err: dict[str, Any], overrides: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    from stream.settings import config_path

    loc = err.get("loc") or ("?",)
    field = str(loc[0])
    var = PREFIX + field.upper()
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    cfg = config_path()
    if err.get("type") == "extra_forbidden":
        close = difflib.get_close_matches(field, list(setting_variables().values()), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown setting {field!r} in the settings file {cfg}{hint}"
    if field in overrides:
        where = f"--{field.replace('_', '-')}={_shown(field, overrides[field])}"
    elif var in environ:
        where = f"{var}={_shown(field, environ[var])}"
    elif cfg:
        where = f"{field!r} in {cfg} (or {var})"
    elif field == "__root__" or field == "?":
        return f"invalid settings: {msg}"
    else:
        where = var
    return f"{where} is invalid: {msg}"


def load_settings(**overrides: Any):  # -> stream.settings.Settings
    """Settings from flags (`overrides`, None = not given), environment and settings file;
    every problem becomes one CliError line naming the EVOSTREAM_* variable."""
    from stream.settings import ConfigFileMissing, Settings, config_path

    given = {k: v for k, v in overrides.items() if v is not None}
    env = dict(os.environ)
    try:
        return Settings(**given)
    except ConfigFileMissing as exc:
        raise CliError(str(exc), ExitCode.USAGE) from exc
    except ValidationError as exc:
        parts = [_describe(e, given, env) for e in exc.errors(include_input=False, include_url=False)]
        raise CliError("; ".join(parts), ExitCode.USAGE) from exc
    except (ValueError, OSError) as exc:  # a settings file that does not parse
        raise CliError(f"cannot read settings file {config_path()}: {exc}", ExitCode.USAGE) from exc


def _readme_meanings() -> dict[str, str]:
    """{EVOSTREAM_NAME: meaning} from the README's configuration table, when the README is
    there (a checkout / editable install); tests/test_docs.py keeps that table complete."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2] / "README.md"
    try:
        text = readme.read_text()
    except OSError:
        return {}
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^\| `(EVOSTREAM_[A-Z0-9_]+)` \|[^|]*\|(.*)\|\s*$", text, re.M)}


def settings_help() -> str:
    """Every setting as `EVOSTREAM_NAME = default. meaning`, for `evostream settings --help`."""
    from stream.settings import Settings

    meanings = _readme_meanings()
    lines = []
    for name, f in Settings.model_fields.items():
        if f.default_factory is not None:
            default = "(computed)"
        else:
            default = repr(getattr(f.default, "value", f.default))
        var = f"{PREFIX}{name.upper()}"
        desc = meanings.get(var) or f.description or ""
        lines.append(f"{var} = {default}. {desc}".rstrip())
    return "\n\n".join(lines)


__all__ = ["AUXILIARY_PREFIXES", "AUXILIARY_VARIABLES", "check_environment", "deprecated_variables", "load_settings",
           "setting_variables", "settings_help"]
