"""The public surface: ``__all__`` lists exactly what the package exports."""

from __future__ import annotations

import supervisor
import supervisor.controlplane


def _public(module: object) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("supervisor")
        and not isinstance(value, type(supervisor))
    }


def test_all_matches_the_importable_public_names() -> None:
    assert set(supervisor.__all__) == _public(supervisor)
    assert supervisor.__all__ == sorted(supervisor.__all__)


def test_every_name_in_all_is_importable() -> None:
    for module in (supervisor, supervisor.controlplane):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name} is in __all__ but missing"


def test_controlplane_all_is_sorted_and_complete() -> None:
    assert supervisor.controlplane.__all__ == sorted(supervisor.controlplane.__all__)
    public = _public(supervisor.controlplane) - {"NO_HEARTBEAT"}
    assert public <= set(supervisor.controlplane.__all__)
