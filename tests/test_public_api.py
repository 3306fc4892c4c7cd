"""The public API: everything in `kerascool.__all__` imports, is documented, and fits on one screen."""

import inspect

import kerascool


def test_every_public_name_imports_and_has_a_docstring():
    assert len(kerascool.__all__) == len(set(kerascool.__all__))
    for name in kerascool.__all__:
        obj = getattr(kerascool, name)
        assert inspect.getdoc(obj), f"kerascool.{name} has no docstring"


def test_public_api_fits_on_one_screen():
    assert len(kerascool.__all__) <= 60, "the public API should fit on one screen"


def test_nothing_public_is_missing_from_all():
    public = {n for n, v in vars(kerascool).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public <= set(kerascool.__all__), sorted(public - set(kerascool.__all__))
