"""Bring your own environment: `environment.kind = 'python'`.

Owns `load_object` (resolve 'module:attr', 'path/to/file.py:attr' or the name of a
`trustee.environments` entry point), `build_python_env` (call the user's factory with an
`EnvContext` and check that what comes back implements the `Environment` protocol) and
`check_factory` (the start-up check, also run by --dry-run). Called by `envs.BUILDERS`.
It knows nothing about what the user's environment does.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trustee.envs import EnvContext
    from trustee.envs.base import Environment

ENTRY_POINT_GROUP = "trustee.environments"
REQUIRED = ("name", "make_task", "start", "step", "score")


class FactoryError(ValueError):
    """A factory (or function) named in the config cannot be loaded or returned the wrong thing."""


def _load_file(path: Path) -> Any:
    if not path.exists():
        raise FactoryError(
            f"file {path} not found (relative paths start at the working directory {Path.cwd()})"
        )
    name = "trustee_user_" + "_".join(path.resolve().with_suffix("").parts[-2:]).replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_object(spec: str, field: str) -> Any:
    """The object `spec` names: 'pkg.module:attr', 'path/to/file.py:attr', or (no colon) the
    name of an entry point in the `trustee.environments` group. `field` names the config key
    in errors."""
    if not spec:
        raise FactoryError(
            f"{field} is empty; set it to 'my_pkg.my_env:make_env' or 'path/to/env.py:make_env'"
        )
    if ":" not in spec:
        found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        if spec not in found:
            known = sorted(found) or "none installed"
            raise FactoryError(
                f"{field} = {spec!r}: no ':' so it names an entry point of group {ENTRY_POINT_GROUP!r}, "
                f"but there is none by that name (known: {known}); write 'module:function' or register "
                f'[project.entry-points."{ENTRY_POINT_GROUP}"] in your package'
            )
        return found[spec].load()
    where, attr = spec.rsplit(":", 1)
    try:
        module = _load_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
    except FactoryError as e:
        raise FactoryError(f"{field} = {spec!r}: {e}") from None
    except ImportError as e:
        raise FactoryError(
            f"{field} = {spec!r}: cannot import {where!r} ({e}); install the package, run from the directory "
            "that holds it, or give a file path such as 'path/to/env.py:make_env'"
        ) from None
    if not hasattr(module, attr):
        names = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise FactoryError(f"{field} = {spec!r}: {where!r} has no {attr!r}; its callables: {names}")
    return getattr(module, attr)


def missing_methods(env: Any) -> list[str]:
    """What `env` lacks of the Environment protocol (async methods must be coroutines)."""
    out = [n for n in REQUIRED if not hasattr(env, n)]
    out += [
        f"{n} (must be 'async def')"
        for n in ("make_task", "start", "step", "score")
        if hasattr(env, n) and not inspect.iscoroutinefunction(getattr(env, n))
    ]
    return out


def build_python_env(ctx: EnvContext) -> Environment:
    """Call the factory `environment.factory` with the context; check the result."""
    factory = load_object(ctx.config.factory, "environment.factory")
    if not callable(factory):
        raise FactoryError(f"environment.factory = {ctx.config.factory!r} is not callable")
    env = factory(ctx)
    missing = missing_methods(env)
    if missing:
        raise FactoryError(
            f"environment.factory = {ctx.config.factory!r} returned {type(env).__name__}, which lacks "
            f"{', '.join(missing)} of the Environment protocol (trustee/envs/base.py; docs/environments.md)"
        )
    return env


def check_factory(spec: str) -> list[str]:
    """Start-up check: the factory imports and is callable (it is not called)."""
    try:
        obj = load_object(spec, "environment.factory")
    except FactoryError as e:
        return [str(e)]
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing; report it
        return [f"environment.factory = {spec!r}: importing it raised {type(e).__name__}: {e}"]
    if not callable(obj):
        return [f"environment.factory = {spec!r} is not callable"]
    return []
