"""Running a sweep: trials one after another with Optuna, each a nested MLflow run, pruned on its intermediate
validation metric, stopped cleanly on a signal, the best trial registered."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from core.callbacks import Callback
from core.errors import UsageError

if TYPE_CHECKING:
    import optuna

    from core.trainer import Trainer
from core.sweep.plan import SweepPlan
from core.sweep.settings import PRUNED, default_storage, existing_study_id, open_storage, parse_pruner
from core.sweep.space import apply_params
from core.sweep.status import SweepObserver, SweepOutcome, SweepStatus


class _Interrupted(Exception):
    """The sweep was asked to stop (SIGTERM/SIGINT) while this trial was due to train or training."""


class _TrialFailed(Exception):
    """This trial failed on its own (refused values, diverged, out of memory); the sweep goes on."""


def _interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    return bool(trial.user_attrs.get("interrupted"))


def _counts(study: optuna.Study) -> tuple[int, int, int]:
    """(complete, pruned, failed) trials of ``study``; failed ones interrupted by a stop are not counted."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    failed = sum(t.state == TrialState.FAIL and not _interrupted(t) for t in trials)
    return complete, pruned, failed


class _Pruning(Callback):
    """Trainer callback of one trial: reports each evaluation's metric to Optuna (step = the evaluation's number,
    see the module docstring) and stops the trainer with the stop rule :data:`PRUNED` when the pruner says so (the
    final evaluation, after the loop, cannot stop anything)."""

    def __init__(self, trial: optuna.Trial, metric: str, trainer_of: typing.Callable[[], Trainer | None]):
        self.trial = trial
        self.metric = metric
        self.trainer_of = trainer_of
        self.values: list[float] = []
        self.pruned_at: int | None = None

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        value = float(metrics[self.metric])
        self.values.append(value)
        self.trial.report(value, len(self.values))
        trainer = self.trainer_of()
        if self.pruned_at is None and trainer is not None and self.trial.should_prune():
            self.pruned_at = step
            trainer.request_stop(PRUNED)


class _Sweep:
    """One session of a sweep: the study, the parent run, the signal flag and the observer."""

    def __init__(self, plan: SweepPlan, observer: SweepObserver):
        from core.store import connect

        self.plan = plan
        self.settings = plan.settings
        self.observer = observer
        self.client = connect(plan.tracking.tracking_uri)
        self.started = time.monotonic()
        self.stop_signal: str | None = None
        self.trainer: Trainer | None = None
        self.out_of_time = False
        self.durations: list[float] = []
        self.status: SweepStatus | None = None
        self.study: optuna.Study | None = None

    # -- signals ---------------------------------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signal.Signals(signum).name
        if self.trainer is not None:
            self.trainer.request_stop(self.stop_signal)

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT stop the sweep: the training trial after its current step, and no new trial starts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # -- the parent run and the study ------------------------------------------------------------------------------

    def _sampler(self, n_existing: int) -> optuna.samplers.BaseSampler:
        import optuna

        if self.settings.sampler == "grid":
            # The seed shuffles the grid, whose positions the study records: a resumed sweep needs the same one.
            space = {s.name: list(s.choices) for s in self.settings.space}
            return optuna.samplers.GridSampler(space, seed=self.settings.seed)
        # A resumed study gets another seed: the same one would draw the first trials' values again.
        seed = self.settings.seed + n_existing
        if self.settings.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def create(self) -> None:
        """Create the parent run, then the study that names it; if the study cannot be made the run ends FAILED."""
        import optuna

        from core.store import ensure_experiment
        from core.tracking import log_params, process_tags

        plan, settings = self.plan, self.settings
        experiment_id = ensure_experiment(self.client, plan.tracking.experiment)
        tags = {"sweep.name": settings.name, "sweep.storage": plan.storage, "sweep.role": "parent", **process_tags()}
        run = self.client.create_run(experiment_id, run_name=plan.tracking.run_name or settings.name, tags=tags)
        parent_run_id = run.info.run_id
        try:
            params = {
                "sweep.metric": settings.metric,
                "sweep.sampler": settings.sampler,
                "sweep.pruner": settings.pruner,
                "sweep.seed": settings.seed,
                "sweep.trial_budget": settings.trial_budget,
                **{f"space.{spec.name}": spec.text.partition("=")[2] for spec in settings.space},
            }
            log_params(self.client, parent_run_id, params)
            self._log_limits(parent_run_id)
            stored = {
                "settings": settings.to_dict(),
                "model": plan.model.to_dict(),
                "data": dataclasses.asdict(plan.data),
                "train": plan.train.to_dict(),
                "tracking": {k: v for k, v in dataclasses.asdict(plan.tracking).items() if k not in ("tracking_uri",)},
            }
            self.client.log_text(parent_run_id, json.dumps(stored, indent=2), "sweep.json")
            study = optuna.create_study(
                storage=open_storage(plan.storage),
                study_name=settings.name,
                direction="minimize",
                sampler=self._sampler(0),
                pruner=parse_pruner(settings.pruner),
            )
            study.set_user_attr("sweep", stored)
            study.set_user_attr("parent_run_id", parent_run_id)
        except BaseException as exc:
            self.client.set_tag(parent_run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
            self.client.set_terminated(parent_run_id, "FAILED")
            raise
        plan.parent_run_id = parent_run_id
        self.study = study

    def _log_limits(self, parent_run_id: str) -> None:
        # Tags, not params: a resumed sweep may be given other limits, and MLflow params never change.
        self.client.set_tag(parent_run_id, "sweep.trials", str(self.settings.n_trials))
        self.client.set_tag(parent_run_id, "sweep.time_budget", str(self.settings.time_budget))

    def reopen(self) -> None:
        """Load the study of a resumed sweep, mark the trials its stopped process left RUNNING failed and
        interrupted (their runs end KILLED), queue every interrupted trial's values to be tried again (once), and
        take the parent run over (RUNNING again, with this process's tags)."""
        import optuna
        from mlflow.entities import RunTag
        from optuna.trial import TrialState

        from core.jobs import DIED_ERROR
        from core.tracking import PID_TAG, process_tags

        plan = self.plan
        storage = open_storage(plan.storage)
        study = optuna.load_study(study_name=self.settings.name, storage=storage)
        study_id = storage.get_study_id_from_name(self.settings.name)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            run_id = trial.user_attrs.get("run_id")
            if run_id is not None:
                run = self.client.get_run(run_id)
                if run.info.status == "RUNNING":
                    self.client.set_tag(run_id, "error", DIED_ERROR.format(pid=run.data.tags.get(PID_TAG)))
                    self.client.set_terminated(run_id, "KILLED")
                self.client.set_tag(run_id, "sweep.state", "FAIL")
        # Queued trials run before any new one (a grid sampler counts an interrupted combination as tried). The
        # study remembers which were queued, so that a sweep stopped again does not queue them twice.
        retried = set(study.user_attrs.get("retried", []))
        for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if _interrupted(trial) and trial.params and trial.number not in retried:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                retried.add(trial.number)
        study.set_user_attr("retried", sorted(retried))
        study.sampler = self._sampler(len(study.trials))
        study.pruner = parse_pruner(self.settings.pruner)
        parent_run_id = plan.parent_run_id
        parent = self.client.get_run(parent_run_id)
        self.client.log_batch(parent_run_id, tags=[RunTag(k, v) for k, v in process_tags().items()])
        for key in ("error", "stop_reason"):  # they described how the previous session ended
            if key in parent.data.tags:
                self.client.delete_tag(parent_run_id, key)
        self._log_limits(parent_run_id)
        self.client.update_run(parent_run_id, status="RUNNING")
        self.study = study

    # -- trials ----------------------------------------------------------------------------------------------------

    def report(self, **changes) -> None:
        complete, pruned, failed = _counts(self.study)
        self.status = dataclasses.replace(
            self.status,
            complete=complete,
            pruned=pruned,
            failed=failed,
            elapsed_s=time.monotonic() - self.started,
            **changes,
        )
        self.observer.on_status(self.status)

    def objective(self, trial: optuna.Trial) -> float:
        """Train one trial as a nested run; its value is the lowest metric over its evaluations."""
        from core.errors import StudioError
        from core.experiment import run_training

        plan, settings = self.plan, self.settings
        if self.stop_signal is not None:
            trial.set_user_attr("interrupted", True)
            raise _Interrupted(self.stop_signal)
        params = {spec.name: spec.suggest(trial) for spec in settings.space}
        complete, pruned, failed = _counts(self.study)
        self.report(
            trial_number=trial.number,
            trial_index=complete + pruned + failed + 1,
            trial_run_id=None,
            trial_params=params,
        )
        started = time.monotonic()
        try:
            model, data, train = apply_params(plan.model, plan.data, plan.train, params, settings.space)
        except ValueError as exc:  # e.g. n_embd=int:64:256 drew 65 with 4 heads: this trial only, no run
            trial.set_user_attr("error", str(exc))
            raise _TrialFailed(str(exc)) from None
        tracking = dataclasses.replace(
            plan.tracking,
            run_name=f"{settings.name}-trial-{trial.number}",
            parent_run_id=plan.parent_run_id,
            register=False,
            alias=None,
        )
        pruning = _Pruning(trial, settings.metric, lambda: self.trainer)
        callbacks = [pruning, *self.observer.trial_callbacks(trial.number, train)]

        def on_trainer(trainer: Trainer) -> None:
            self.trainer = trainer
            if self.stop_signal is not None:  # a signal while the trainer was being built
                trainer.request_stop(self.stop_signal)

        def on_run_created(run_id: str) -> None:
            trial.set_user_attr("run_id", run_id)
            tags = {
                "sweep.name": settings.name,
                "sweep.trial_number": str(trial.number),
                "sweep.params": json.dumps(params),
                "sweep.state": "RUNNING",
            }
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
            self.report(trial_run_id=run_id)

        try:
            outcome = run_training(
                model,
                data,
                train,
                tracking,
                callbacks,
                on_run_created=on_run_created,
                on_trainer=on_trainer,
                stop_rules=(PRUNED,),
                handle_signals=False,
            )
        except BaseException as exc:
            run_id = trial.user_attrs.get("run_id")
            if run_id is not None:  # run_training has ended it FAILED
                self.client.set_tag(run_id, "sweep.state", "FAIL")
            if isinstance(exc, (FloatingPointError, StudioError)):
                # This trial's own failure (a diverging learning rate, a batch too large for the device): the
                # sweep goes on with the next trial. Anything else (the store failing, a bug) stops the sweep.
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
                raise _TrialFailed(str(exc)) from exc
            raise
        finally:
            self.trainer = None
        self.durations.append(time.monotonic() - started)
        result = outcome.result
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("stop_reason", result.stop_reason)
        if outcome.status == "KILLED":  # stopped by the sweep's signal: redone when the sweep resumes
            self.client.set_tag(outcome.run_id, "sweep.state", "FAIL")
            trial.set_user_attr("interrupted", True)
            raise _Interrupted(result.stop_reason)
        if result.best_checkpoint is not None:
            trial.set_user_attr("checkpoint", str(result.best_checkpoint))
        if not pruning.values:
            self.client.set_tag(outcome.run_id, "sweep.state", "FAIL")
            raise _TrialFailed(f"trial {trial.number} logged no {settings.metric}")
        best = min(pruning.values)
        self.client.set_tag(outcome.run_id, f"sweep.{settings.metric}", repr(best))
        if result.stop_reason == PRUNED:
            self.client.set_tag(outcome.run_id, "sweep.state", "PRUNED")
            import optuna

            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
        self.client.set_tag(outcome.run_id, "sweep.state", "COMPLETE")
        return best

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback after each trial: the parent run's best so far, the observer, and the stop checks."""
        from optuna.trial import TrialState

        best = self._best()
        if best is not None:
            parent = self.plan.parent_run_id
            self.client.log_metric(parent, f"best_{self.settings.metric}", best.value, step=trial.number)
            self.client.set_tag(parent, "sweep.best_trial", str(best.number))
            self.client.set_tag(parent, "sweep.best_run_id", str(best.user_attrs.get("run_id")))
        value = trial.value if trial.state == TrialState.COMPLETE else None
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        last = {
            "number": trial.number,
            "state": trial.state.name,
            "value": value,
            "run_id": trial.user_attrs.get("run_id"),
            "steps": trial.user_attrs.get("steps"),
            "error": trial.user_attrs.get("error"),
        }
        self.report(last_trial=last, **self._best_fields(best))
        if self.stop_signal is not None:
            study.stop()
        elif self.settings.time_budget is not None:
            left = self.settings.time_budget - (time.monotonic() - self.started)
            needed = self.settings.trial_budget or (sum(self.durations) / len(self.durations) if self.durations else 0)
            if left < needed:
                self.out_of_time = True
                study.stop()

    def _best(self) -> optuna.trial.FrozenTrial | None:
        from optuna.trial import TrialState

        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return min(complete, key=lambda t: t.value) if complete else None

    @staticmethod
    def _best_fields(best: optuna.trial.FrozenTrial | None) -> dict[str, Any]:
        if best is None:
            return {"best_value": None, "best_trial": None, "best_run_id": None, "best_params": {}}
        return {
            "best_value": best.value,
            "best_trial": best.number,
            "best_run_id": best.user_attrs.get("run_id"),
            "best_params": dict(best.params),
        }

    # -- the end ---------------------------------------------------------------------------------------------------

    def finish(self, stop_reason: str) -> SweepOutcome:
        """Register the best trial's best-validation checkpoint with the alias and end the parent run FINISHED
        (without a model when no trial completed)."""
        from core.registry import log_and_register

        plan, parent = self.plan, self.plan.parent_run_id
        best = self._best()
        name = version = None
        self.report(phase="finishing", trial_number=None, trial_run_id=None, **self._best_fields(best))
        if best is not None:
            checkpoint = best.user_attrs.get("checkpoint")
            if checkpoint is None:
                raise UsageError(f"the best trial, {best.number}, has no best-validation checkpoint to register")
            registered = log_and_register(
                self.client,
                best.user_attrs["run_id"],
                checkpoint,
                name=plan.tracking.register_as,
                alias=plan.tracking.alias,
                description=f"best trial ({best.number}) of sweep {self.settings.name}: "
                f"{self.settings.metric} {best.value:.4f}",
            )
            name, version = registered.name, str(registered.version)
            self.client.set_tag(parent, "registered_model", f"{name}/{version}")
            self.client.set_tag(best.user_attrs["run_id"], "registered_model", f"{name}/{version}")
        self.client.set_tag(parent, "stop_reason", stop_reason)
        self.client.set_terminated(parent, "FINISHED")
        return self._outcome("FINISHED", stop_reason, best, name, version)

    def stopped(self, stop_reason: str) -> SweepOutcome:
        """End the parent run KILLED: the study stays as it is, to be resumed."""
        parent = self.plan.parent_run_id
        self.client.set_tag(parent, "stop_reason", stop_reason)
        self.client.set_terminated(parent, "KILLED")
        return self._outcome("KILLED", stop_reason, self._best(), None, None)

    def _outcome(self, status, stop_reason, best, name, version) -> SweepOutcome:
        complete, pruned, failed = _counts(self.study)
        self.report(phase="ended", trial_number=None, trial_run_id=None, stop_reason=stop_reason)
        fields = self._best_fields(best)
        return SweepOutcome(
            name=self.settings.name,
            parent_run_id=self.plan.parent_run_id,
            status=status,
            stop_reason=stop_reason,
            complete=complete,
            pruned=pruned,
            failed=failed,
            best_trial=fields["best_trial"],
            best_value=fields["best_value"],
            best_run_id=fields["best_run_id"],
            best_params=fields["best_params"],
            model_name=name,
            model_version=version,
        )


def run_sweep(plan: SweepPlan, observer: SweepObserver | None = None, *, on_parent_created=None) -> SweepOutcome:
    """Carry out ``plan``: create (or, for a resumed plan, take over) the parent run and the study, run trials one
    after another with ``study.optimize`` until the trials asked for are done (counting a resumed study's earlier
    ones), the time budget is spent, a grid is exhausted or a signal stops it; then register the best trial's model.

    ``on_parent_created(run_id)`` is called once the parent run exists (or is taken over). SIGTERM and SIGINT (in the
    main thread) stop the running trial after its current step; the sweep then ends KILLED and can be resumed. An
    error ends the parent run FAILED and is raised; a trial's own failure (refused values, divergence, a too large
    batch) only fails that trial.
    """
    observer = observer or SweepObserver()
    sweep = _Sweep(plan, observer)
    settings = plan.settings
    with sweep.signals():
        if plan.parent_run_id is None:
            sweep.create()
        else:
            sweep.reopen()
        if on_parent_created is not None:
            on_parent_created(plan.parent_run_id)
        sweep.status = SweepStatus(
            name=settings.name,
            parent_run_id=plan.parent_run_id,
            metric=settings.metric,
            n_trials=settings.n_trials,
            time_budget=settings.time_budget,
        )
        try:
            sweep.report(**sweep._best_fields(sweep._best()))
            complete, pruned, failed = _counts(sweep.study)
            left = None if settings.n_trials is None else settings.n_trials - (complete + pruned + failed)
            if left is None or left > 0:
                # An interrupted trial is marked FAIL (and interrupted) by Optuna; the stop reason is the signal's.
                with contextlib.suppress(_Interrupted):
                    sweep.study.optimize(
                        sweep.objective, n_trials=left, catch=(_TrialFailed,), callbacks=[sweep.after_trial]
                    )
            if sweep.stop_signal is not None:
                return sweep.stopped(f"stopped: {sweep.stop_signal}")
            complete, pruned, failed = _counts(sweep.study)
            if sweep.out_of_time:
                reason = "time_budget"
            elif settings.n_trials is not None and complete + pruned + failed < settings.n_trials:
                reason = "grid"  # the grid sampler stops the study once every combination was tried
            else:
                reason = "trials"
            return sweep.finish(reason)
        except BaseException as exc:
            client, parent = sweep.client, plan.parent_run_id
            client.set_tag(parent, "error", f"{type(exc).__name__}: {exc}"[:5000])
            client.set_terminated(parent, "FAILED")
            raise


def study_trials(name: str, storage: str | None = None) -> list[dict[str, Any]]:
    """Every trial of sweep ``name``: ``number``, ``state``, ``value``, ``params``, ``run_id``, ``interrupted``.
    UsageError when there is no such sweep."""
    storage = storage or default_storage()
    opened, study_id = existing_study_id(storage, name)
    if study_id is None:
        raise UsageError(f"no sweep named {name!r} in {storage}")
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": dict(t.params),
            "run_id": t.user_attrs.get("run_id"),
            "interrupted": _interrupted(t),
        }
        for t in opened.get_all_trials(study_id, deepcopy=False)
    ]
