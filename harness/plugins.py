"""Loading user plugin files: each one's @register_variant, @register_suite and register_family
calls add to the registries."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from harness.errors import ConfigError
from harness.registry import RegistryError
from harness.suite import SuiteError

_LOADED: set[str] = set()  # absolute paths already imported in this process


def plugin_path(path: str | Path) -> str:
    """The absolute path a plugin is recorded under (a run resumes from any folder)."""
    return str(Path(path).expanduser().resolve())


def check_plugin(path: str | Path) -> None:
    """Reject a plugin path that is not an existing `.py` file (one-line ConfigError)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plugin file not found: {path}")
    if path.suffix != ".py":
        raise ConfigError(f"plugin {path} is not a Python file; expected a .py file")


def load_plugins(paths) -> None:
    """Import each plugin file once; a broken file is a one-line ConfigError naming it."""
    for path in map(Path, paths):
        check_plugin(path)
        if plugin_path(path) in _LOADED:
            continue
        name = f"attnbench_plugin_{path.stem}_{abs(hash(str(path.resolve()))):x}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except SyntaxError as exc:
            raise ConfigError(f"plugin {path} has a syntax error at line {exc.lineno}: "
                              f"{exc.msg}") from None
        except (RegistryError, SuiteError):
            raise
        except SystemExit as exc:  # a script's sys.exit() ends the import, not this program
            raise ConfigError(f"plugin {path} called sys.exit({exc.code!r}) on import") from None
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(f"plugin {path} raised on import: {type(exc).__name__}: "
                              f"{first}") from None
        _LOADED.add(plugin_path(path))
