"""The scheduling framework: filters -> weighted scorers -> picker over one snapshot of the
signals (``framework``), plugins one module each (``filters/``, ``scorers/``,
``pickers/``, registered in ``plugins``), and the per-route ``Scheduler`` that keeps
decisions flat in fleet size. Policies (``extproc.policies``) are compositions of it."""

from .framework import Candidate, Filter, Picker, Profile, Scorer, Snapshot
from .plugins import FilterList, PickerSpec, PluginSpec, ScorerList, spec
from .scheduler import Scheduler

__all__ = ["Candidate", "Filter", "FilterList", "Picker", "PickerSpec", "PluginSpec", "Profile", "Scheduler",
           "Scorer", "ScorerList", "Snapshot", "spec"]
