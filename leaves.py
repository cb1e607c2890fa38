"""Optional parts ("leaves"), each imported in one place, by name, when first asked for.

A table of leaves maps a name to "module:attribute". Nothing is imported until a name is looked up, so a fork deletes a
leaf's file (and, to tidy up, its line in the table) and everything else still runs; asking for the deleted leaf is then
one line saying which file it needs. docs/fork.md lists the leaves and the minimal set of files.
"""
import importlib
import importlib.util
from collections.abc import Mapping


class MissingLeaf(ValueError):
    """A leaf whose file this copy of the project does not have."""


class Leaves(Mapping):
    """`what` names the kind of part in messages ("sampler", "method"); `entries` maps each name
    to "module:attribute", or to "module" for the module itself."""

    def __init__(self, what: str, entries: dict[str, str]):
        self.what, self.entries = what, dict(entries)

    def __getitem__(self, name: str):
        module, _, attribute = self.entries[name].partition(":")
        try:
            imported = importlib.import_module(module)
            return getattr(imported, attribute) if attribute else imported
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise  # a dependency of the leaf is missing, not the leaf: a real error, with its traceback
            raise MissingLeaf(f"{self.what} {name!r} needs {module.replace('.', '/')}.py, which this copy of the "
                              "project does not have") from None

    def __contains__(self, name) -> bool:  # without importing anything
        return name in self.entries

    def present(self, name: str) -> bool:
        """Whether the leaf is listed and its file is there, for a leaf that only makes things faster."""
        return name in self.entries and importlib.util.find_spec(self.entries[name].partition(":")[0]) is not None

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)
