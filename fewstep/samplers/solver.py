"""A solver's entry in a registry (SOLVERS, KAC_SOLVERS): its function and how many steps an NFE budget buys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Solver:
    fn: Callable
    steps_for_nfe: Callable[[int], int]  # the most steps whose NFE fits the budget
    stochastic: bool = False  # draws SDE noise (from ``generator``) along the way
    min_nfe: int = 1
