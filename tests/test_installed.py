"""When run by tests/run.sh, the suite must exercise the installed wheel, not the sources."""

from __future__ import annotations

import os
import pathlib

import samopt
import samopt._core


def test_samopt_comes_from_the_installed_wheel_when_required() -> None:
    sources = pathlib.Path(__file__).resolve().parents[1] / "python"
    module = pathlib.Path(samopt._core.__file__).resolve()
    from_sources = sources in module.parents
    if os.environ.get("SAMOPT_EXPECT_INSTALLED") == "1":
        assert not from_sources, f"samopt imported from the source tree: {module}"
        assert "site-packages" in module.parts
    # Either way the typing files ship next to the package.
    package = pathlib.Path(samopt.__file__).parent
    assert (package / "py.typed").is_file()
    assert (package / "_core.pyi").is_file()
