"""Step hooks: everything that happens per iteration or per epoch besides the step itself.

A hook overrides some of these methods; each gets the one loop state (``engine.state.TrainingState``):

=====================  =====================================================================  ==========
event                  when                                                                   called by
=====================  =====================================================================  ==========
``before_fit``         once, before the first epoch (a resumed run's hook states are loaded)  fit
``before_epoch``       each time an epoch's training starts or continues (``state.iteration``  train_one_epoch
                       > 0: continuing a partial epoch, keep the epoch's sums)
``after_backward``     after the backward pass, before clipping and the optimizer step        train_one_epoch
``after_step``         after every optimizer step (host work only: never read the device)     train_one_epoch
``at_read_back``       every ``print_freq`` iterations, where the loop reads device values     train_one_epoch
                       back, and for the epoch's last partial window (``state.epoch_end``)
``at_boundary``        a step-boundary stop (``state.request_boundary``: periodic checkpoint,  train_one_epoch
                       or a signal): ``state.progress`` says how far the epoch got
``after_train_epoch``  the epoch is trained (means reduced), before evaluation                train_one_epoch
``after_epoch``        with the epoch's ``EpochResult``, after evaluation                      fit
``on_finding``         a diagnosis made inside an epoch (an iteration-level spike)             the finder
``on_interrupt``       a KeyboardInterrupt inside an iteration (weights not at a boundary)     fit
``after_fit``          once, after the last epoch                                              fit
=====================  =====================================================================  ==========

Order: hooks run by ascending ``priority`` (stable: equal priorities keep the list's order), for every
event. ``MEASURE`` (gradient norms, timer) < ``MONITOR`` (spikes) < ``GUARD`` (divergence: a spike
is said before the NaN it precedes) < ``CONTROL`` (periodic checkpoints) < ``CHECKPOINT`` < ``OUTPUT``
(console, diagnostics, trackers, files, progress).

Ranks: a hook with ``main_process_only`` (everything that writes) runs on rank 0 only; the others run on
every rank, and must, when they take part in collectives (the divergence guard's check, evaluation) or
feed the record every rank returns (gradient norms, spikes, timer).

Failures: a hook with ``critical`` (guards, checkpoints) propagates its exception and stops training; any
other hook's first failure is logged once as a warning, the hook is switched off, and training goes on.

State: a hook whose ``state_dict`` returns a dict keeps state across epochs; the checkpoint stores it
under the hook's ``state_key`` and ``fit`` loads it back before ``before_fit``, so a resumed run
continues exactly (no special case in the loop).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskrcnn_coco.analysis.diagnostics import Diagnosis
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.utils.dist import is_main_process

log = logging.getLogger(__name__)

MEASURE, MONITOR, GUARD, CONTROL, CHECKPOINT, OUTPUT = 10, 20, 30, 40, 50, 60

EVENTS = ("before_fit", "before_epoch", "after_backward", "after_step", "at_read_back", "at_boundary",
          "after_train_epoch", "after_epoch", "on_finding", "on_interrupt", "after_fit")


@dataclass
class EpochResult:
    """One finished epoch: ``record`` (components, metrics, lrs, ...) and ``scalars`` (``{tag: value}``).

    Hooks may add artifacts for the hooks after them (the checkpointer sets ``checkpoint``).
    """

    epoch: int
    record: dict[str, Any]
    scalars: dict[str, float]
    checkpoint: Path | None = None


class Hook:
    """Base class: every event is a no-op, so a hook overrides only what it needs."""

    priority: int = OUTPUT
    main_process_only: bool = True
    critical: bool = False

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def before_fit(self, state: TrainingState) -> None:
        pass

    def before_epoch(self, state: TrainingState) -> None:
        pass

    def after_backward(self, state: TrainingState) -> None:
        pass

    def after_step(self, state: TrainingState) -> None:
        pass

    def at_read_back(self, state: TrainingState) -> None:
        pass

    def at_boundary(self, state: TrainingState) -> None:
        pass

    def after_train_epoch(self, state: TrainingState) -> None:
        pass

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        pass

    def on_finding(self, state: TrainingState, finding: Diagnosis) -> None:
        pass

    def on_interrupt(self, state: TrainingState) -> None:
        pass

    def after_fit(self, state: TrainingState) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        """State kept across epochs (plain data and tensors), or None for a stateless hook."""
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class HookList:
    """The hooks of this rank in their order, dispatching each event only to the hooks that override it
    (per iteration that is a short list of bound methods: no lookup, no hook that does nothing)."""

    def __init__(self, hooks: Iterable[Hook] = ()):
        main = is_main_process()
        ordered = sorted(hooks, key=lambda h: h.priority)
        self.hooks: list[Hook] = [h for h in ordered if main or not h.main_process_only]
        self._failed: set[int] = set()
        self._calls: dict[str, list[tuple[Hook, Any]]] = {}
        self._index()

    def _index(self) -> None:
        self._calls = {
            event: [(h, getattr(h, event)) for h in self.hooks
                    if id(h) not in self._failed and getattr(type(h), event, None) is not getattr(Hook, event)]
            for event in EVENTS
        }

    def __iter__(self):
        return iter(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)

    def add(self, hook: Hook) -> None:
        """Insert ``hook`` at its priority (after the hooks of equal priority)."""
        if is_main_process() or not hook.main_process_only:
            self.hooks = sorted([*self.hooks, hook], key=lambda h: h.priority)
            self._index()

    def find(self, kind: type) -> Any | None:
        """The first hook of this rank that is a ``kind``, or None."""
        return next((h for h in self.hooks if isinstance(h, kind)), None)

    def listens(self, event: str) -> bool:
        """Whether any hook of this rank handles ``event``."""
        return bool(self._calls[event])

    def call(self, event: str, *args: Any) -> None:
        for hook, method in self._calls[event]:
            if hook.critical:
                method(*args)
                continue
            try:
                method(*args)
            except Exception as err:  # noqa: BLE001 - an output's failure must not stop training
                self._switch_off(hook, event, err)

    def _switch_off(self, hook: Hook, event: str, err: Exception) -> None:
        log.warning("Hook %s failed in %s (%s: %s); training goes on without it.", type(hook).__name__, event,
                    type(err).__name__, err)
        self._failed.add(id(hook))
        self._index()

    # The per-iteration events, spelled out: the loop calls these every step.
    def after_backward(self, state: TrainingState) -> None:
        if self._calls["after_backward"]:
            self.call("after_backward", state)

    def after_step(self, state: TrainingState) -> None:
        if self._calls["after_step"]:
            self.call("after_step", state)

    def state_dicts(self) -> dict[str, Any]:
        """``{state_key: state}`` of the stateful hooks (for the checkpoint)."""
        out = {}
        for hook in self.hooks:
            state = hook.state_dict()
            if state is not None:
                out[hook.state_key] = state
        return out

    def load_state_dicts(self, states: Mapping[str, Any]) -> None:
        for hook in self.hooks:
            if hook.state_key in states:
                hook.load_state_dict(states[hook.state_key])


def as_hook_list(hooks: HookList | Sequence[Hook] | None) -> HookList:
    return hooks if isinstance(hooks, HookList) else HookList(hooks or ())
