"""Accuracy against cost: the Pareto front, the points a run and a report plot, the figure."""

from __future__ import annotations

from mim_agg.report.cost import CostPoint, cost_figure, pareto_front, run_points


def head(name, accuracy, params, gflops=1.0, group=""):
    return CostPoint(name, group, accuracy, params, gflops)


def test_pareto_front_keeps_the_heads_no_cheaper_head_beats():
    points = [
        head("cls", 0.70, 1_000),
        head("mean", 0.68, 1_000),  # as cheap as cls, less accurate
        head("abmilp", 0.74, 1_800),
        head("gated", 0.73, 200_000),  # costlier and worse than abmilp
        head("attentive", 0.77, 7_000_000),
        head("twin", 0.77, 8_000_000),  # as accurate as a cheaper head: not on the front
    ]
    front = [p.head for p in pareto_front(points, "params")]
    assert front == ["cls", "abmilp", "attentive"]
    # by GFLOPs (all 1.0 but one): the single most accurate among the cheapest
    points.append(head("cheap", 0.5, 10, gflops=0.1))
    assert [p.head for p in pareto_front(points, "gflops")] == ["cheap", "attentive"]


def test_a_runs_points_are_its_aggregators_at_their_held_out_selected_rate():
    rows = [
        {"head": "abmilp_blr0p1", "val/acc1_best": 0.6, "test/acc1": 0.5, "trainable_params": 9},
        {"head": "abmilp_blr1", "val/acc1_best": 0.7, "test/acc1": 0.4, "trainable_params": 9},
        {"head": "cls_blr1", "val/acc1_best": None, "test/acc1": None, "trainable_params": 5},
    ]
    for row in rows:
        row["added_gflops"] = 0.01
    (point,) = run_points(rows)  # the diverged cls head has no accuracy, no point
    assert (point.head, point.accuracy, point.params) == ("abmilp", 0.4, 9.0)


def test_the_figure_has_two_log_panels_with_every_head_labelled_and_the_front_drawn():
    points = [head("cls", 0.70, 1_000, 0.002), head("abmilp", 0.74, 1_800, 0.003)]
    points += [head("gated", 0.73, 200_000, 0.2)]
    fig = cost_figure(points, "a title")
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        assert sorted(t.get_text() for t in ax.texts) == ["abmilp", "cls", "gated"]
        (front,) = ax.get_lines()  # the staircase, on to the costliest head
        assert list(front.get_ydata()) == [70.0, 74.0, 74.0]
    assert fig.axes[0].get_xlabel() == "trainable parameters (log scale)"
    assert fig.axes[1].get_xlabel() == "added GFLOPs per image (log scale)"
