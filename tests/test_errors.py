"""One exception tree: every exception class defined in ``app`` derives from ``CascadeBaseError`` and
is named in the tree that ``app.errors`` documents."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import app
from app import errors
from app.errors import CascadeBaseError


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(app.__path__, "app."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[name] = obj
    return found


def test_every_exception_of_the_package_is_in_the_one_tree() -> None:
    classes = _exception_classes()
    assert len(classes) > 30  # the walk saw the package
    outside = {name for name, cls in classes.items() if not issubclass(cls, CascadeBaseError)}
    assert outside == set()
    documented = errors.__doc__ or ""
    assert [name for name in classes if name not in documented] == []
