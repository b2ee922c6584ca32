"""Dependency graph: trace a model, couple channel spaces into Groups, exact cost model."""

from secateurs.graph.build import DependencyGraph, build, dense_counts
from secateurs.graph.groups import Group, Member

__all__ = ["DependencyGraph", "Group", "Member", "build", "dense_counts"]
