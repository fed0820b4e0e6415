"""Parameter importance and parallel coordinates on recorded experiments: no training, seconds.

Experiments are written here as a sweep leaves them (saved config, trials.jsonl, each trial's
history.jsonl); every expected value is computed here from the raw values written, never by yolotune.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import pytest
import yaml

from yolotune import plots, report
import yolotune.importance
from yolotune.importance import MIN_TRIALS, TREES, importance
from yolotune.results import load
from yolotune.results_cli import main as results_main

FITNESS = "fitness"
SPACE = {"lr0": "loguniform(1e-4, 0.1)", "momentum": "uniform(0.6, 0.98)", "batch": "choice([8, 16, 32])",
         "close_mosaic": "randint(0, 10)"}
EVENTS = {"TERMINATED": ["started", "completed"], "ERROR": ["started", "errored"], "RUNNING": ["started"]}


def recorded(exp_dir: Path, space: dict, trials: list, mode: str = "max") -> Path:
    """An experiment directory: ``trials`` = [(sampled config, fitness at each epoch, status)], a
    fitness of None: an epoch that validated nothing."""
    (exp_dir / ".hydra").mkdir(parents=True)
    config = {"name": exp_dir.name, "iterations": len(trials), "metric": FITNESS, "mode": mode, "space": space,
              "train": {"epochs": 3}, "model": {"weights": "yolo11n.yaml"}}
    (exp_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    events = []
    for n, (sampled, values, status) in enumerate(trials):
        trial_id = f"t{n:03d}"
        for event in EVENTS[status]:
            events.append({"trial_id": trial_id, "event": event, "status": "RUNNING" if event == "started" else status,
                           "time": 1000.0 + n, **({"config": sampled} if event == "started" else {}),
                           **({"error": "RuntimeError: boom"} if event == "errored" else {})})
        rows = [{"epoch": e + 1, "validated": int(v is not None), **({FITNESS: v} if v is not None else {}),
                 "train/box_loss": 1.0, "timestamp": 1000.0 + 10 * n + e, "time_this_iter_s": 1.0}
                for e, v in enumerate(values)]
        history = exp_dir / f"trial_{trial_id}" / "history.jsonl"
        history.parent.mkdir()
        history.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (exp_dir / "trials.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return exp_dir


def sampled(rng: random.Random, space: dict = SPACE) -> dict:
    """A config drawn from SPACE (or a space of uniform entries named otherwise)."""
    draw = {"lr0": lambda: 10 ** rng.uniform(-4, -1), "momentum": lambda: rng.uniform(0.6, 0.98),
            "batch": lambda: rng.choice([8, 16, 32]), "close_mosaic": lambda: rng.randint(0, 10)}
    return {name: draw[name]() if name in draw else rng.uniform(0, 1) for name in space}


def decided_by(name: str, config: dict) -> float:
    """A fitness that the one parameter ``name`` alone decides."""
    value = config[name]
    if name == "lr0":
        return -(math.log10(value) + 2.5) ** 2
    return {8: 0.1, 16: 0.5, 32: 0.3}[value] if name == "batch" else value


def decided_experiment(exp_dir: Path, name: str, trials: int = 30, shuffle: bool = False) -> Path:
    """``trials`` finished trials whose fitness ``name`` decides; shuffled: ``name``'s sampled values moved
    to other trials, so that it decides nothing."""
    rng = random.Random(7)
    configs = [sampled(rng) for _ in range(trials)]
    fitness = [decided_by(name, c) for c in configs]
    if shuffle:
        moved = [c[name] for c in configs]
        rng.shuffle(moved)
        configs = [{**c, name: v} for c, v in zip(configs, moved)]
    # each trial's best is its first epoch, its last worse by chance: only the best counts
    return recorded(exp_dir, SPACE, [(c, [f, f - rng.uniform(0, 5)], "TERMINATED") for c, f in zip(configs, fitness)])


# --- importance -------------------------------------------------------------------------------

@pytest.mark.parametrize("decisive", list(SPACE))  # a log range, a range, a choice, an integer range
def test_the_parameter_that_alone_decides_the_metric_is_the_most_important(tmp_path, decisive):
    judged = importance(load(decided_experiment(tmp_path / "exp", decisive)))
    assert judged.reason is None and judged.trials == 30 and "fANOVA" in judged.method
    assert set(judged.values) == set(SPACE)
    assert max(judged.values, key=judged.values.get) == decisive and judged.values[decisive] > 0.5
    assert sum(judged.values.values()) == pytest.approx(1.0)


@pytest.fixture
def fitted(monkeypatch) -> list:
    """Each forest fitted, as (its trials' values, its trees): what importance costs, counted."""
    from optuna.importance import FanovaImportanceEvaluator

    forests, evaluate, init = [], FanovaImportanceEvaluator.evaluate, FanovaImportanceEvaluator.__init__

    def counting_init(self, *args, n_trees=64, **kwargs):
        self.counted_trees = n_trees
        init(self, *args, n_trees=n_trees, **kwargs)

    def counting_evaluate(self, study, *args, **kwargs):
        forests.append(([t.value for t in study.trials], self.counted_trees))
        return evaluate(self, study, *args, **kwargs)

    monkeypatch.setattr(FanovaImportanceEvaluator, "__init__", counting_init)
    monkeypatch.setattr(FanovaImportanceEvaluator, "evaluate", counting_evaluate)
    return forests


@pytest.mark.parametrize("over", [0, 1, 80])
def test_past_max_fitted_trials_the_forest_is_fitted_on_the_best_and_a_sample_of_the_rest(tmp_path, fitted,
                                                                                          monkeypatch, over):
    """Importance's cost stops growing with the trials: one forest of TREES trees, on MAX_FITTED of
    them at most, the best BEST_FITTED always among them; the parameter that decides still first.
    (A smaller MAX_FITTED here: the same rule, in a tenth of the time.)"""
    monkeypatch.setattr(yolotune.importance, "MAX_FITTED", 40)
    monkeypatch.setattr(yolotune.importance, "BEST_FITTED", 10)
    MAX_FITTED, BEST_FITTED = 40, 10  # noqa: N806 - the module's, as set
    trials = MAX_FITTED + over
    exp_dir = decided_experiment(tmp_path / "exp", "lr0", trials=trials)
    best = sorted((decided_by("lr0", c) for c in configs_of(exp_dir)), reverse=True)
    judged = importance(load(exp_dir))
    assert len(fitted) == 1
    values, trees = fitted[0]
    assert trees == TREES and len(values) == min(trials, MAX_FITTED) == judged.fitted and judged.trials == trials
    assert sorted(values, reverse=True)[:BEST_FITTED] == pytest.approx(best[:BEST_FITTED])
    assert max(judged.values, key=judged.values.get) == "lr0" and judged.values["lr0"] > 0.5
    if trials > MAX_FITTED:
        assert judged.sampled == (f"fitted on {MAX_FITTED} of {trials} trials: the best {BEST_FITTED} and "
                                  f"{MAX_FITTED - BEST_FITTED} drawn at random from the rest")
        assert set(values) < set(best)  # a sample, not every trial
        assert judged.sampled in plots.figure(load(exp_dir), "importance").axes[0].get_xlabel()  # the plot says so
    else:
        assert judged.sampled is None and sorted(values) == pytest.approx(sorted(best))


def configs_of(exp_dir: Path) -> list:
    events = [json.loads(line) for line in (exp_dir / "trials.jsonl").read_text().splitlines()]
    return [e["config"] for e in events if e["event"] == "started"]


def test_a_parameter_whose_values_were_shuffled_is_not_the_most_important(tmp_path):
    judged = importance(load(decided_experiment(tmp_path / "exp", "lr0", shuffle=True)))
    assert judged.reason is None and max(judged.values, key=judged.values.get) != "lr0"
    assert judged.values["lr0"] < 0.5


def test_errored_trials_are_left_out_and_trials_stopped_early_count_at_their_best(tmp_path):
    """Errored trials hold the only high momentum and the best fitness: counted, they would make it decide."""
    rng = random.Random(3)
    finished = [sampled(rng) for _ in range(20)]
    for c in finished:
        c["momentum"] = rng.uniform(0.6, 0.7)
    trials = [(c, [decided_by("lr0", c) - 1, decided_by("lr0", c)], "TERMINATED") for c in finished]
    trials[0] = (trials[0][0], [decided_by("lr0", trials[0][0])], "TERMINATED")  # stopped after one epoch
    trials += [({**sampled(rng), "momentum": 0.97}, [5.0], "ERROR") for _ in range(10)]
    judged = importance(load(recorded(tmp_path / "exp", SPACE, trials)))
    assert judged.trials == 20
    assert max(judged.values, key=judged.values.get) == "lr0" and judged.values["momentum"] < 0.2


def test_mid_sweep_running_trials_count_at_the_best_of_the_epochs_they_reached(tmp_path):
    """One trial has ended, too few to judge; the running ones, at their best so far, make the trials to
    judge on: their first epoch, which lr0 decides, not their latest validated one, lower, which momentum
    decides (their epoch in progress has validated nothing)."""
    rng = random.Random(5)
    ended = [(c, [10 + decided_by("lr0", c)], "TERMINATED") for c in [sampled(rng)]]
    running = [(c, [10 + decided_by("lr0", c), 7 + decided_by("momentum", c), None], "RUNNING")
               for c in (sampled(rng) for _ in range(20))]
    judged = importance(load(recorded(tmp_path / "exp", SPACE, ended + running)))
    assert judged.reason is None and judged.trials == 21
    assert max(judged.values, key=judged.values.get) == "lr0" and judged.values["lr0"] > 0.5


@pytest.mark.parametrize("usable, judged", [(MIN_TRIALS - 1, False), (MIN_TRIALS, True)])
def test_too_few_trials_say_importance_cannot_be_judged_yet(tmp_path, usable, judged):
    rng = random.Random(1)
    trials = [(c, [decided_by("momentum", c)], "TERMINATED") for c in (sampled(rng) for _ in range(usable))]
    trials += [(sampled(rng), [0.5], "ERROR"), (sampled(rng), [None], "TERMINATED")]  # neither counts
    result = importance(load(recorded(tmp_path / "exp", SPACE, trials)))
    assert result.trials == usable and bool(result.values) == judged
    assert (result.reason is None) == judged
    if not judged:
        assert result.reason.startswith("cannot be judged yet") and f"at least {MIN_TRIALS}" in result.reason


def test_trials_that_all_scored_the_same_say_importance_cannot_be_judged_yet(tmp_path):
    rng = random.Random(2)
    exp_dir = recorded(tmp_path / "exp", SPACE, [(sampled(rng), [0.5], "TERMINATED") for _ in range(8)])
    result = importance(load(exp_dir))
    assert result.values == {} and result.reason == f"cannot be judged yet: every trial has the same {FITNESS}"


def test_the_command_line_and_the_report_show_the_importance(tmp_path, capsys):
    """`yolotune results --format json`, its table (report.details) and report.html."""
    exp_dir = decided_experiment(tmp_path / "exp", "batch")
    want = importance(load(exp_dir)).values
    assert results_main([str(exp_dir), "--format", "json", "--report"]) == 0
    data = json.loads(capsys.readouterr().out)["importance"]
    assert data["metric"] == FITNESS and "fANOVA" in data["method"] and data["trials"] == 30
    assert (data["fitted"], data["trees"], data["sampled"]) == (30, TREES, None)  # all of them: no sample
    assert list(data["importance"]) == list(want) and list(want)[0] == "batch" and data["reason"] is None
    assert "best validated value" in data["counted"]
    out = report.details(load(exp_dir), None, {}).splitlines()
    head = next(i for i, line in enumerate(out) if line.startswith(f"Parameter importance for best {FITNESS}"))
    rows = [line.split() for line in out[head + 2:head + 2 + len(SPACE)]]
    assert [(name, float(value)) for name, value in rows] == [(n, pytest.approx(v, abs=1e-4)) for n, v in want.items()]
    page = (exp_dir / "report.html").read_text()
    assert "<h2>Parameter importance</h2>" in page and f"<tr><td>batch</td><td>{want['batch']:.3f}</td></tr>" in page
    assert (exp_dir / "plots" / "importance.png").is_file()


def test_the_importance_plot_names_its_method_and_draws_each_parameters_share(tmp_path):
    results = load(decided_experiment(tmp_path / "exp", "lr0"))
    want = importance(results).values
    ax = plots.figure(results, "importance").axes[0]
    assert "fANOVA" in ax.get_title() and "30 trials" in ax.get_title()
    names = [t.get_text() for t in ax.get_yticklabels()]
    widths = [bar.get_width() for bar in ax.patches]
    assert dict(zip(names, widths)) == pytest.approx(want) and names[-1] == "lr0"  # the most important on top


def test_the_importance_plot_says_why_it_has_no_bars(tmp_path):
    exp_dir = recorded(tmp_path / "exp", SPACE, [(sampled(random.Random(0)), [0.5], "TERMINATED")])
    fig = plots.figure(load(exp_dir), "importance")
    assert [t.get_text() for t in fig.axes[0].texts] == [
        f"Importance cannot be judged yet: 1 trial with a value of {FITNESS} (errored ones left out); "
        f"it needs at least {MIN_TRIALS}"]


def test_without_optuna_or_scikit_learn_importance_says_how_to_get_it(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "sklearn" else find_spec(name, *args))
    result = importance(load(decided_experiment(tmp_path / "exp", "lr0", trials=6)))
    assert result.values == {} and result.reason == "needs sklearn: pip install 'yolotune[importance]'"


# --- parallel coordinates ------------------------------------------------------------------------

def test_parallel_coordinates_draw_each_trial_at_its_values_on_log_choice_and_metric_axes(tmp_path):
    rng = random.Random(5)
    trials = [(c, [0.1, 0.1 + decided_by("momentum", c)], "TERMINATED") for c in (sampled(rng) for _ in range(12))]
    trials += [(sampled(rng), [None], "TERMINATED")]  # no value: not drawn
    results = load(recorded(tmp_path / "exp", SPACE, trials))
    ax = plots.figure(results, "parallel").axes[0]
    drawn = {line.get_gid(): list(line.get_ydata()) for line in ax.get_lines()}
    scored = {f"t{n:03d}": (config, values[-1]) for n, (config, values, _) in enumerate(trials[:12])}
    low, high = min(v for _, v in scored.values()), max(v for _, v in scored.values())
    want = {trial_id: [math.log(c["lr0"] / 1e-4) / math.log(0.1 / 1e-4), (c["momentum"] - 0.6) / 0.38,
                       [8, 16, 32].index(c["batch"]) / 2, c["close_mosaic"] / 10, (value - low) / (high - low)]
            for trial_id, (c, value) in scored.items()}
    assert drawn.keys() == want.keys()
    for trial_id, places in want.items():
        assert drawn[trial_id] == pytest.approx(places)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lr0 (log)", "momentum", "batch", "close_mosaic",
                                                            f"best {FITNESS}"]
    best = max(scored, key=lambda t: scored[t][1])
    assert max(ax.get_lines(), key=lambda line: line.get_linewidth()).get_gid() == best


def test_a_value_past_the_space_is_judged_and_drawn_on_a_widened_axis(tmp_path):
    """PBT may move a value past the space's bounds, or (a space edited before a resume) off its choices."""
    rng = random.Random(6)
    trials = [(c, [c["momentum"]], "TERMINATED") for c in (sampled(rng) for _ in range(8))]
    trials[0][0].update(lr0=0.4, batch=64)  # past loguniform(1e-4, 0.1) and choice([8, 16, 32])
    results = load(recorded(tmp_path / "exp", SPACE, trials))
    assert set(importance(results).values) == set(SPACE)
    ax = plots.figure(results, "parallel").axes[0]
    first = next(line for line in ax.get_lines() if line.get_gid() == "t000")
    assert list(first.get_ydata())[:3] == pytest.approx([1.0, (trials[0][0]["momentum"] - 0.6) / 0.38, 1.0])
    batch_ticks = [t.get_text() for t in ax.texts if abs(t.get_position()[0] - 2.04) < 1e-9]
    assert batch_ticks == ["8", "16", "32", "64"]


# --- plots stay readable -----------------------------------------------------------------------------

LONG = "a_parameter_with_a_name_much_longer_than_any_axis_label_should_ever_be_" * 2


def case(name: str, rng: random.Random):
    """(space, trials) of each readability case."""
    if name == "long names":
        space = {f"{LONG}{k}": "uniform(0, 1)" for k in range(6)}
        return space, [(sampled(rng, space), [rng.random()], "TERMINATED") for _ in range(10)]
    if name == "all NaN metrics":
        return SPACE, [(sampled(rng), [math.nan, None], "TERMINATED") for _ in range(6)]
    if name == "one value":
        space = {**SPACE, "batch": "choice([16])"}
        return space, [({**sampled(rng), "batch": 16}, [rng.random()], "TERMINATED") for _ in range(8)]
    trials = {"one trial": 1, "200 trials": 200}[name]
    return SPACE, [(sampled(rng), [rng.random(), rng.random()], "TERMINATED") for _ in range(trials)]


@pytest.mark.parametrize("name", ["long names", "all NaN metrics", "one value", "one trial", "200 trials"])
def test_every_plot_is_written_without_a_warning(tmp_path, name):
    space, trials = case(name, random.Random(11))
    results = load(recorded(tmp_path / "exp", space, trials))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's layout warnings and Optuna's would fail here
        written = plots.save(results)
    assert set(written) == set(plots.KINDS) and all(p.stat().st_size > 0 for p in written.values())
    if name == "one value":
        assert importance(results).values["batch"] == 0.0
    if name == "long names":
        labels = [t.get_text() for t in plots.figure(results, "parallel").axes[0].get_xticklabels()]
        assert max(map(len, labels)) <= plots.LABEL_CHARS and len(set(labels)) == len(labels)


def test_the_report_embeds_the_parallel_coordinates_and_importance_plots(tmp_path):
    exp_dir = decided_experiment(tmp_path / "exp", "momentum", trials=8)
    written = report.write_all(exp_dir)
    assert {"parallel", "importance"} <= set(written)
    page = written["report"].read_text()
    assert "<figcaption>parallel.png</figcaption>" in page and "<figcaption>importance.png</figcaption>" in page


def test_a_log_distribution_is_judged_on_its_log_scale(tmp_path):
    """lr0 ~ loguniform gets the importance that log10(lr0) ~ uniform gets with the same trials."""
    rng = random.Random(4)
    configs = [sampled(rng) for _ in range(15)]
    trials = [(c, [decided_by("lr0", c) + c["momentum"]], "TERMINATED") for c in configs]
    as_log = importance(load(recorded(tmp_path / "log", SPACE, trials))).values
    linear = [({**c, "lr0": math.log10(c["lr0"])}, values, status) for c, values, status in trials]
    as_linear = importance(load(recorded(tmp_path / "linear", {**SPACE, "lr0": "uniform(-4, -1)"}, linear))).values
    assert as_log == pytest.approx(as_linear, rel=1e-6)
