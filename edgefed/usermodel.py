"""Load the user's model from a factory spec: ``"my_models:make_net"`` or ``"pkg.mod:func"``.

Why its own module: the coordinator (``[model] factory``), the model artefact's loader and
``edgefed export --run`` all rebuild the same ``nn.Module`` from the same spec, and a user
mistake in it (missing file, no such function, not a Module) must end in ONE line naming the
spec, the path tried and what was found, never a traceback. Torch side: imports torch when a
factory is called (a factory builds a torch module), so torch-free code never imports this.

Resolution of ``<module>:<function>``:
* ``<module>`` ending in ``.py`` or containing a ``/`` is a file, relative to ``base_dir``
  (the directory of the coordinator config) unless absolute;
* otherwise ``<base_dir>/<module>.py`` when that file exists ("a .py beside the config"),
  else an importable module (``importlib.import_module``).
The factory is called without arguments and must return an ``nn.Module``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UserModelError(ValueError):
    """A factory spec that cannot be loaded or does not build an nn.Module (one line)."""


def split_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise UserModelError(
            f"[model] factory: expected 'file.py:function' or 'package.module:function', "
            f"found {spec!r}"
        )
    mod, func = spec.split(":")
    if not mod or not func.isidentifier():
        raise UserModelError(
            f"[model] factory {spec!r}: expected '<module or file.py>:<function name>'"
        )
    return mod, func


def resolve_file(spec: str, base_dir: str | Path | None) -> Path | None:
    """The .py file a spec names (absolute), or None when it names an importable module."""
    mod, _ = split_spec(spec)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if mod.endswith(".py") or "/" in mod or "\\" in mod:
        p = Path(mod)
        return (p if p.is_absolute() else base / p).resolve()
    beside = base / (mod.replace(".", "/") + ".py")
    return beside.resolve() if beside.is_file() else None


def canonical_spec(spec: str, base_dir: str | Path | None) -> str:
    """The spec with a file made absolute, so it still resolves from another directory
    (the model artefact records this form)."""
    mod, func = split_spec(spec)
    f = resolve_file(spec, base_dir)
    return f"{f}:{func}" if f is not None else f"{mod}:{func}"


def _load_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise UserModelError(f"[model] factory {spec!r}: file {path} does not exist")
    name = "edgefed_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    ispec = importlib.util.spec_from_file_location(name, path)
    if ispec is None or ispec.loader is None:
        raise UserModelError(f"[model] factory {spec!r}: {path} is not a loadable Python file")
    module = importlib.util.module_from_spec(ispec)
    sys.path.insert(0, str(path.parent))  # the user's file may import its neighbours
    sys.modules[name] = module
    try:
        ispec.loader.exec_module(module)
    except Exception as e:  # the user's code: report, never a traceback
        sys.modules.pop(name, None)
        raise UserModelError(
            f"[model] factory {spec!r}: importing {path} failed: {type(e).__name__}: {e}"
        ) from e
    finally:
        sys.path.remove(str(path.parent))
    return module


def load_factory(spec: str, base_dir: str | Path | None = None) -> Callable[[], Any]:
    """The factory function a spec names (not yet called)."""
    mod, func = split_spec(spec)
    f = resolve_file(spec, base_dir)
    if f is not None:
        module = _load_file(f, spec)
        where = str(f)
    else:
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            tried = Path(base_dir or Path.cwd()) / (mod.replace(".", "/") + ".py")
            raise UserModelError(
                f"[model] factory {spec!r}: no file {tried} and no importable module {mod!r} ({e})"
            ) from e
        except Exception as e:
            raise UserModelError(
                f"[model] factory {spec!r}: importing {mod} failed: {type(e).__name__}: {e}"
            ) from e
        where = mod
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UserModelError(
            f"[model] factory {spec!r}: {where} has no function {func!r} "
            f"(found {type(fn).__name__ if fn is not None else 'nothing'})"
        )
    return fn


def build_user_model(spec: str, base_dir: str | Path | None = None) -> Any:
    """Call the factory; check it returned an ``nn.Module``."""
    from torch import nn

    fn = load_factory(spec, base_dir)
    try:
        net = fn()
    except Exception as e:
        raise UserModelError(
            f"[model] factory {spec!r}: calling it failed: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(net, nn.Module):
        raise UserModelError(
            f"[model] factory {spec!r}: expected it to return a torch.nn.Module, "
            f"found {type(net).__name__}"
        )
    return net
