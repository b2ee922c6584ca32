"""Dependency graph: trace a model, couple channel spaces into Groups, exact cost model."""

from secateurs.graph.groups import Group, Member

__all__ = ["Group", "Member"]
