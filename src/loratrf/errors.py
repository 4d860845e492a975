"""loratrf's error types: every refusal names the problem and what would fix it."""

from __future__ import annotations


class LoRATRFError(Exception):
    """Base class of every error loratrf raises on purpose."""


class InjectionError(LoRATRFError, ValueError):
    """A pattern, module or option that `inject` (or a preset, or a module's constructor) cannot honour."""


class FilterOutputError(LoRATRFError, ValueError):
    """A task-aware filter met a module output it cannot filter (another width, or no tensor),
    or filters that `calibrate_filters` cannot calibrate."""


class MergeError(LoRATRFError, RuntimeError):
    """A merge that would corrupt the base weights, or training through a merged layer."""


class AdapterFileError(LoRATRFError, ValueError):
    """An adapter file that is unreadable, from another model, or inconsistent."""


class AdapterError(LoRATRFError, ValueError):
    """A named adapter the model does not hold (or already holds), a batch `use_adapters`
    cannot give one adapter per row, or adapters that `combine_adapters` cannot add up."""
