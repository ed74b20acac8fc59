"""``analysis/history.py``: metrics.jsonl read back, and the objective of a run."""

import math

from maskrcnn_coco.analysis.history import objective_value, read_history


def test_objective_value_final_and_best():
    history = [
        {"epoch": 1, "mAP/segm_AP": 0.2, "loss/val": 1.0, "loss/train_total": 2.0},
        {"epoch": 2, "mAP/segm_AP": 0.5, "loss/val": 0.7, "loss/train_total": 1.0},
        {"epoch": 3, "mAP/segm_AP": 0.4, "loss/val": 0.9, "loss/train_total": 0.8},
        {"epoch": 4, "loss/train_total": 0.7},  # not evaluated: the last epoch that has it counts
    ]
    assert objective_value(history, "mAP/segm_AP", "final") == 0.4
    assert objective_value(history, "mAP/segm_AP", "best") == 0.5
    assert objective_value(history, "loss/val", "best") == 0.7
    assert objective_value(history, "loss/train_total", "final") == 0.7
    assert math.isnan(objective_value(history, "mAP/bbox_AP", "final"))


def test_history_reads_jsonl(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert read_history(run) == []
    (run / "metrics.jsonl").write_text('{"epoch": 1, "loss/val": 0.5, "mAP/segm_AP": 0.25}\n\n')
    assert read_history(run) == [{"epoch": 1, "loss/val": 0.5, "mAP/segm_AP": 0.25}]


def test_the_best_epoch_is_chosen_among_epochs_measured_on_the_whole_val_set():
    from maskrcnn_coco.analysis.history import best_epoch, objective_value

    history = [  # eval.subset=3 of 7: a subset's AP (0.9) is another measure than the full set's (0.5)
        {"epoch": 1, "mAP/segm_AP50": 0.9, "eval/images": 3.0, "eval/val_images": 7.0},
        {"epoch": 2, "mAP/segm_AP50": 0.5, "eval/images": 7.0, "eval/val_images": 7.0},
    ]
    assert best_epoch(history, "mAP/segm_AP50") == (2, 0.5)
    assert objective_value(history, "mAP/segm_AP50", "best") == 0.5
    assert best_epoch([{"epoch": 1, "mAP/segm_AP50": 0.4}], "mAP/segm_AP50") == (1, 0.4)  # runs without eval/*
