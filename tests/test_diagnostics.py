"""``analysis/diagnostics.py``: the in-training diagnoses on synthetic histories, and iteration-level spikes.

The hook that reports them is tests/test_writers.py's."""

import math
import random
import statistics

import pytest
from helpers import PARTS, falling, make_history

from maskrcnn_coco.analysis.diagnostics import chance_values, confused_classes, diagnose, iteration_spikes
from maskrcnn_coco.config import LOSS_COMPONENTS, DiagnosticsConfig

# README "What the default run gives": train epoch means of the default run (5 epochs, 250 steps each).
README_DEFAULT_RUN = [
    (0.4215, 0.3165, 0.6192, 0.1237, 0.0071),
    (0.3318, 0.2966, 0.3634, 0.0294, 0.0046),
    (0.2577, 0.2475, 0.2469, 0.0115, 0.0035),
    (0.1954, 0.2043, 0.1984, 0.0069, 0.0028),
    (0.1413, 0.1457, 0.1719, 0.0045, 0.0021),
]
README_VAL_TOTAL = [1.2071, 0.8959, 0.6329, 0.4836, 0.4355]
K = 3  # shapes: circle, square, triangle


def findings_each_epoch(history, **kwargs):
    """What diagnose reports after each epoch as the run goes."""
    return {h["epoch"]: diagnose(history[:i + 1], num_classes=K, **kwargs) for i, h in enumerate(history)}


def kinds(found):
    return sorted((d.kind, d.components) for d in found)


# ---------------------------------------------------------------------------------- healthy runs
@pytest.mark.parametrize("steps_per_epoch", [None, 250])
def test_the_readme_default_run_raises_nothing(steps_per_epoch):
    history = make_history(README_DEFAULT_RUN, extra={e: {"loss/val": v} for e, v in enumerate(README_VAL_TOTAL, 1)})
    for epoch, found in findings_each_epoch(history, steps_per_epoch=steps_per_epoch).items():
        assert found == [], (epoch, [d.text() for d in found])


def test_noisy_short_runs_raise_nothing():
    """1-2 epoch runs of any (non-dominated) noise: no monitor looks at epoch 1, trends need patience."""
    rng = random.Random(0)
    for _ in range(200):
        rows = [[rng.uniform(0.05, 1.5) for _ in LOSS_COMPONENTS] for _ in range(2)]
        vals = [[rng.uniform(0.05, 15.0) for _ in LOSS_COMPONENTS] for _ in range(2)]
        rows = [[min(v, 3 * statistics.median(r)) for v in r] for r in rows]  # no 10x dominance
        history = make_history(rows, vals)
        for found in findings_each_epoch(history).values():
            assert found == [], [d.text() for d in found]


def test_the_early_transient_of_tiny_runs_stays_quiet():
    """A measured tiny run (8 steps per epoch): loss_box_reg rises while the RPN starts producing
    positives and the val losses jump. Within the first min_steps steps nothing is a trend."""
    rows = [(0.7339, 0.1522, 0.8876, 0.6813, 0.0446), (0.4081, 0.1772, 0.9021, 0.5785, 0.0428), (0.4349, 0.2177, 0.7208, 0.3342, 0.0495)]
    vals = [(7.8915, 1.3975, 3.4694, 0.5822, 0.0580), (13.8378, 11.3983, 11.2089, 2.2147, 0.5278), (1.7709, 0.9730, 1.2680, 1.9141, 0.4051)]
    history = make_history(rows, vals)
    assert diagnose(history, num_classes=K, steps_per_epoch=8) == []
    # The same numbers as settled epochs would be a rise: min_steps is what keeps the transient quiet.
    assert ("rising", ("loss_box_reg",)) in kinds(diagnose(history, num_classes=K, steps_per_epoch=None))


# --------------------------------------------------------------------------------------- faults
def test_a_component_stuck_at_its_chance_value_is_named():
    ln2 = math.log(2)
    history = make_history(falling(5, loss_mask=[ln2 + 0.001, ln2 - 0.002, ln2 + 0.001, ln2, ln2 - 0.001]))
    found = findings_each_epoch(history)
    assert found[1] == [] and found[2] == []  # never on epoch 1; two epochs are one change, not yet a pattern
    first = min(e for e, f in found.items() if f)
    assert first == 3
    assert kinds(found[first]) == [("at_chance", ("loss_mask",))]  # not also "stalled"
    d = found[first][0]
    assert d.config_key == "optimizer.head_lr_multiplier" and "0.693" in d.text()
    assert "roi_heads.mask_head and roi_heads.mask_predictor" in d.cause
    assert d.text().endswith("(see docs/LOSS_BREAKDOWN.md#stuck-at-chance)")


def test_the_classifier_at_ln_k_plus_1_is_stuck_at_chance():
    chance = chance_values(K)["loss_classifier"]
    assert chance == pytest.approx(math.log(4))
    history = make_history(falling(4, loss_classifier=[chance * 1.01, chance, chance * 0.995, chance]))
    assert kinds(diagnose(history, num_classes=K)) == [("at_chance", ("loss_classifier",))]


def test_coming_down_through_chance_is_not_stuck():
    ln2 = math.log(2)
    history = make_history(falling(3, loss_mask=[ln2 * 1.04, ln2 * 1.0, ln2 * 0.96]))
    assert diagnose(history, num_classes=K) == []


def test_a_rising_component_needs_patience_and_names_only_itself():
    box = [0.4, 0.36, 0.40, 0.44, 0.49]
    history = make_history(falling(5, loss_box_reg=box))
    found = findings_each_epoch(history)
    assert found[3] == []  # one rise (epoch 2 -> 3) is not yet a pattern
    assert kinds(found[4]) == [("rising", ("loss_box_reg",))]
    d = found[4][0]
    assert "0.36 -> 0.4 -> 0.44" in d.text() and "loss.weights.loss_box_reg" in d.config_key


def test_a_stalled_component_while_the_others_fall():
    history = make_history(falling(4, loss_mask=[0.6, 0.35, 0.349, 0.3485]))
    assert kinds(diagnose(history, num_classes=K)) == [("stalled", ("loss_mask",))]


def test_nothing_when_every_component_plateaus_together():
    history = make_history([(0.2, 0.2, 0.2, 0.01, 0.005)] * 5)
    assert diagnose(history, num_classes=K) == []


def test_validation_rising_while_training_falls():
    rows = falling(4)
    vals = [{**{c: r[c] * 1.2 for c in LOSS_COMPONENTS}} for r in rows]
    for e, v in enumerate([0.5, 0.55, 0.62, 0.7]):
        vals[e]["loss_classifier"] = v
    history = make_history(rows, vals)
    found = diagnose(history, num_classes=K)
    assert kinds(found) == [("val_rising", ("loss_classifier",))]
    assert "data.val_annotations" in found[0].config_key


def test_a_dominant_weighted_component():
    weights = {"loss_objectness": 50.0}
    history = make_history(falling(3, start=(1.39, 0.14, 1.0, 0.69, 0.03), rate=0.98))
    found = findings_each_epoch(history, loss_weights=weights)
    assert found[1] == []
    assert kinds(found[2]) == [("dominant", ("loss_objectness",))]
    assert found[2][0].config_key == "loss.weights.loss_objectness"


def test_zero_weight_components_never_count_in_the_dominance_median():
    """Late in the README run with loss_mask at weight 0 the RPN terms are the others' median: no alarm."""
    rows = [dict(zip(LOSS_COMPONENTS, r)) for r in README_DEFAULT_RUN]
    history = make_history(rows)
    assert [d for d in diagnose(history, num_classes=K, loss_weights={"loss_mask": 0.0}) if d.kind == "dominant"] == []
    # A huge unoptimised component is not "dominant" either: it is not optimised.
    for r in rows:
        r["loss_mask"] = 50.0
    assert [d for d in diagnose(make_history(rows), num_classes=K, loss_weights={"loss_mask": 0.0}) if d.kind == "dominant"] == []


def test_a_rising_unoptimised_component_is_said_not_optimised():
    mask = [0.6, 0.62, 0.68, 0.75]
    history = make_history(falling(4, loss_mask=mask))
    found = diagnose(history, num_classes=K, loss_weights={"loss_mask": 0.0})
    assert kinds(found) == [("unoptimised_rising", ("loss_mask",))]
    assert "not optimised" in found[0].text() and found[0].config_key == "loss.weights.loss_mask"


def test_a_lagging_class():
    per_class = {e: {"mAP/segm_AP_class_circle": 0.6, "mAP/segm_AP_class_square": 0.55, "mAP/segm_AP_class_triangle": 0.1}
                 for e in (1, 2, 3)}
    history = make_history(falling(3), extra=per_class)
    found = findings_each_epoch(history)
    assert found[1] == []
    assert [(d.kind, d.subject) for d in found[2]] == [("lagging_class", "triangle")]
    # A class learned later than the others and closing the gap is not lagging.
    catching_up = {e: {**row, "mAP/segm_AP_class_triangle": ap} for (e, row), ap in zip(per_class.items(), (0.05, 0.12, 0.25))}
    assert diagnose(make_history(falling(3), extra=catching_up), num_classes=K) == []
    # A low median (an early or hard run) is no evidence of one class lagging.
    low = {e: {k: v / 10 for k, v in row.items()} for e, row in per_class.items()}
    assert diagnose(make_history(falling(3), extra=low), num_classes=K) == []


def confusion(matrix, names=("circle", "square", "triangle")):
    return {"ground_truth": [*names, "background"], "predicted": [*names, "missed"], "matrix": matrix,
            "metric_names": [f"AP_class_{n}" for n in names]}


def class_aps(**aps):
    return {f"mAP/segm_AP_class_{name}": ap for name, ap in aps.items()}


def test_a_one_to_one_swap_of_classes_points_at_the_validation_labels():
    swapped = confusion([[0, 9, 0, 1], [0, 0, 8, 0], [7, 0, 0, 2], [1, 0, 0, 0]])
    rows = confused_classes(swapped, min_matches=5)
    assert [(r["class"], r["most_given"], r["off_share"]) for r in rows] == [
        ("circle", "square", 1.0), ("square", "triangle", 1.0), ("triangle", "circle", 1.0)]
    history = make_history(falling(2, start=(1.39, 0.14, 1.0, 0.69, 0.03), rate=0.99))  # an untrained classifier
    found = diagnose(history, num_classes=K, confusions=[swapped, swapped])
    assert sorted(d.subject for d in found) == ["circle", "square", "triangle"]
    assert all(d.kind == "confused_class" and "data.val_annotations" in d.config_key for d in found)
    assert "swapped one-to-one" in found[0].cause  # whatever the classes' APs
    # One evaluation is not yet a pattern (patience).
    assert diagnose(history[:2], num_classes=K, confusions=[swapped]) == []


def test_a_collapsed_classifier_is_not_blamed_on_the_labels():
    collapsed = confusion([[9, 0, 0, 0], [8, 1, 0, 0], [7, 0, 1, 0], [0, 0, 0, 0]])
    aps = {2: class_aps(circle=0.5, square=0.1, triangle=0.3)}  # square lags, triangle does not
    history = make_history(falling(2, start=(1.39, 0.14, 1.0, 0.69, 0.03), rate=0.99), extra=aps)
    found = diagnose(history, num_classes=K, confusions=[collapsed, collapsed])
    assert [d.subject for d in found] == ["square"]
    assert "optimizer.head_lr_multiplier" in found[0].config_key and "does not tell 'square' from 'circle'" in found[0].cause
    assert "its segm AP 0.100 vs the median class AP 0.300" in found[0].text()


def test_a_classifier_still_sorting_classes_out_is_not_a_finding():
    """The default run (measured): at epochs 2 and 3 most matched squares are detected as circles, while
    the square AP is close to the others'; by epoch 4 it has sorted them out."""
    epoch2 = confusion([[40, 14, 10, 15], [23, 10, 10, 21], [1, 5, 28, 18], [9, 32, 26, 0]])
    epoch3 = confusion([[72, 2, 1, 4], [45, 4, 11, 4], [7, 2, 37, 6], [13, 20, 10, 0]])
    aps = {2: class_aps(circle=0.517, square=0.274, triangle=0.169), 3: class_aps(circle=0.634, square=0.347, triangle=0.403)}
    rows = [(0.4172, 0.3145, 0.5404, 0.1301, 0.0064), (0.33, 0.2893, 0.3626, 0.0305, 0.0048), (0.2387, 0.226, 0.2411, 0.0103, 0.0035)]
    history = make_history(rows, extra=aps)
    assert [r["class"] for r in confused_classes(epoch3) if r["off_share"] > 0.5] == ["square"]
    assert diagnose(history, num_classes=K, confusions=[epoch2, epoch3], steps_per_epoch=250) == []


def test_thresholds_come_from_the_config():
    weights = {"loss_objectness": 50.0}
    history = make_history(falling(3, start=(1.39, 0.14, 1.0, 0.69, 0.03), rate=0.98))
    assert diagnose(history, num_classes=K, loss_weights=weights, config=DiagnosticsConfig(dominance_factor=100)) == []
    assert diagnose(history[:2], num_classes=K, loss_weights=weights, config=DiagnosticsConfig(patience_epochs=3)) == []


# ---------------------------------------------------------------------------- iteration-level spikes
def test_a_loss_spike_names_the_component_that_rose():
    parts = PARTS | {"loss_mask": 4.2}
    found = iteration_spikes(3, loss=(5.0, 57, parts), loss_reference=(1.0, PARTS), grad_norms={}, grad_references={},
                             window=20)
    assert [(f.kind, f.components, f.epoch) for f in found] == [("loss_spike", ("loss_mask",), 3)]
    text = found[0].text()
    assert "iteration 57" in text and "5.0x the run's lowest mean over 20 iterations" in text and "loss_mask 4.2 (21.0x)" in text
    assert "optimizer.lr" in text and "optimizer.clip_grad_norm" in text and "#iteration-spikes" in text
    assert found[0].evidence["ratio"] == 5.0


def test_below_the_factor_or_switched_off_nothing_is_said():
    kwargs = {"loss_reference": (1.0, PARTS), "grad_norms": {"heads": (19.9, 3)}, "grad_references": {"heads": 1.0}, "window": 20}
    assert iteration_spikes(1, loss=(4.9, 3, PARTS), **kwargs) == []
    off = DiagnosticsConfig(spike_loss_factor=0, spike_grad_factor=0)
    assert iteration_spikes(1, loss=(50.0, 3, PARTS), **(kwargs | {"grad_norms": {"heads": (99.0, 3)}}), config=off) == []
    # No reference yet (the run's first window): nothing to compare with.
    assert iteration_spikes(1, loss=(50.0, 3, PARTS), loss_reference=None, grad_norms={}, grad_references={}, window=20) == []


def test_a_gradient_norm_spike_names_the_components_of_its_module():
    found = iteration_spikes(2, loss=None, loss_reference=None,
                             grad_norms={"module.rpn_head": (50.0, 40), "backbone": (1.0, 40)},
                             grad_references={"module.rpn_head": 2.0, "backbone": 1.0}, window=20)
    assert [(f.kind, f.subject, f.components) for f in found] == [
        ("grad_norm_spike", "module.rpn_head", ("loss_objectness", "loss_rpn_box_reg"))]
    assert "grad_norm/module.rpn_head 50 is 25.0x its recent mean (2)" in found[0].text()
