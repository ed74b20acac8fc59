"""``engine/checkpoint.py``: the checkpointer's cadence and contents, and the checkpoint of an interrupt.

Resuming from checkpoints (bit-identical resumes, resume=auto, refused checkpoints) runs whole
trainings: tests/test_experiment.py."""

import pytest
import torch
from helpers import MAPPING, ScriptedLosses, run_fit, scripted_loader

from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine import FitSettings


def test_interrupt_saves_a_checkpoint(tmp_path):
    from maskrcnn_coco.engine import fit

    class Interrupting(list):
        def __iter__(self):
            yield from self[:1]
            raise KeyboardInterrupt

    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = Interrupting(scripted_loader([[1.0] * 5, [1.0] * 5]))
    mapping = CategoryMapping([{"id": 1, "name": "a"}])
    with pytest.raises(KeyboardInterrupt):
        fit(model, opt, loader, None, FitSettings(epochs=2, progress=False), run_dir=tmp_path, mapping=mapping)
    state = torch.load(tmp_path / "checkpoints" / "interrupted.pth", weights_only=True)
    assert state["epoch"] == 0 and float(state["model"]["w"]) == pytest.approx(1.0 - 0.1 * 5)


def test_checkpoint_cadence_and_contents(stub_evaluate, tmp_path):
    from maskrcnn_coco.engine import Checkpointer
    from maskrcnn_coco.engine.checkpoint import FORMAT_VERSION

    directory = tmp_path / "ckpt"
    history, _, _ = run_fit(stub_evaluate, epochs=3, hooks=[Checkpointer(directory, every_n_epochs=2)])
    assert sorted(p.name for p in directory.iterdir()) == ["epoch_002.pth", "last.pth"]  # no epoch_001/003, no temp files
    last = torch.load(directory / "last.pth", weights_only=True)
    assert last["epoch"] == 3 and last["format_version"] == FORMAT_VERSION
    assert last["history"] == history
    assert last["categories"] == MAPPING.state_dict() and last["num_classes"] == MAPPING.num_classes
    assert float(last["model"]["heads"]) == pytest.approx(-0.1 * 3 * (9.0 + 5.0))  # 3 epochs of SGD at lr 0.1
    second = torch.load(directory / "epoch_002.pth", weights_only=True)
    assert second["epoch"] == 2 and second["history"] == history[:2]
