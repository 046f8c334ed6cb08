"""The component registry: names live on their classes, and lists are derived from it."""

from __future__ import annotations

import pytest

from imcap import registry
from imcap.errors import ImcapError


@pytest.fixture
def scratch_attention():
    """Register throwaway attention names and remove them again afterwards."""
    added: list[str] = []

    def add(name: str, cls: type) -> type:
        added.append(name)
        return registry.register("attention", name)(cls)

    yield add
    for name in added:
        registry._registry["attention"].pop(name, None)


def test_a_registered_class_is_found_by_name_and_knows_its_name(scratch_attention):
    class Mine:
        pass

    scratch_attention("mine_for_test", Mine)
    assert registry.get("attention", "mine_for_test") is Mine
    assert registry.name_of(Mine) == "mine_for_test" and registry.name_of(Mine()) == "mine_for_test"
    assert "mine_for_test" in registry.names("attention", "mine_*")
    assert registry.allowed_targets()[registry.target_of(Mine)] == ("attention", "mine_for_test")


def test_a_subclass_does_not_inherit_its_parents_name(scratch_attention):
    class Parent:
        pass

    class Child(Parent):
        pass

    scratch_attention("parent_for_test", Parent)
    assert registry.name_of(Child) is None
    assert registry.target_of(Child) not in registry.allowed_targets()


def test_a_second_class_under_a_taken_name_is_refused(scratch_attention):
    class First:
        pass

    class Second:
        pass

    scratch_attention("taken_for_test", First)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("attention", "taken_for_test")(Second)


def test_an_unknown_name_is_a_one_line_error_listing_the_choices():
    with pytest.raises(ImcapError, match=r"unknown attention 'nope'; choose one of \[.*'additive'"):
        registry.get("attention", "nope")


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown component kind"):
        registry.register("optimizer", "x")


def test_builtin_components_register_on_import():
    assert {"additive", "dot", "multihead", "adaptive"} <= set(registry.names("attention"))


def test_a_new_component_module_is_found_without_being_listed(tmp_path):
    """One class + one YAML: a module of the package that registers a component is found by
    reading the files (no hand list to add it to); one that only mentions @register is not."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "mine.py").write_text('from imcap.registry import register\n\n\n'
                                                 '@register("attention", "mine")\nclass Mine:\n    pass\n')
    (tmp_path / "notes.py").write_text('"""Use it like this:\n    @register("attention", "x")\n"""\n')
    (tmp_path / "sources.py").write_text('from imcap import registry\n\n\n@registry.register("source", "s")\n'
                                         'class S:\n    pass\n')
    assert registry.modules_that_register(tmp_path, "pkg") == ("pkg.models.mine", "pkg.sources")


def test_every_builtin_module_registers_something_and_every_builtin_component_is_found():
    registry.components("attention")  # imports the builtin modules
    owners = {cls.__module__ for kind in registry.KINDS for cls in registry.components(kind).values()
              if cls.__module__.startswith("imcap.")}
    assert owners == set(registry.BUILTIN_MODULES)


def test_a_missing_component_module_is_a_user_error_and_a_broken_one_keeps_its_traceback(tmp_path, monkeypatch):
    with pytest.raises(ImcapError, match="'no_such_module_xyz' cannot be imported"):
        registry.import_components(["no_such_module_xyz"])
    (tmp_path / "broken_components_xyz.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        registry.import_components(["broken_components_xyz"])


def test_a_component_module_whose_package_is_missing_is_a_user_error():
    with pytest.raises(ImcapError, match=r"'no_such_package_xyz.components' cannot be imported"):
        registry.import_components(["no_such_package_xyz.components"])
