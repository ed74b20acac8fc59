"""Reading a run's TensorBoard scalars from Python: ``read_scalars(run_dir)``.

    >>> from maskrcnn_coco.analysis import read_scalars
    >>> scalars = read_scalars("runs/maskrcnn/2024-05-01_12-00-00")
    >>> scalars["mAP/segm_AP"]            # [(epoch, value), ...]
    >>> df = read_scalars(run_dir, as_dataframe=True)   # one row per epoch, one column per tag
    >>> it = read_scalars(run_dir, as_dataframe=True, axis="iter")   # iter/ tags: one row per read-back

Tags are the one vocabulary of ``maskrcnn_coco.tracking.scalars``; steps are epochs, except for the
``iter/`` tags, whose steps are global iterations. The run's
``metrics.jsonl`` holds the same values (``maskrcnn_coco.analysis.history.read_history``), this
reads what TensorBoard shows, every event file of the folder (not its sub-folders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_scalars(run_dir: str | Path, *, as_dataframe: bool = False, axis: str = "epoch") -> Any:
    """``{tag: [(step, value), ...]}`` of every scalar in ``run_dir``'s event files, steps ascending
    (the last value written wins for a repeated step, as after a resume).

    ``as_dataframe=True`` returns a pandas DataFrame instead: index ``step``, one column per tag
    (sorted), NaN where a tag has no value at a step (e.g. mAP on epochs without evaluation), with
    the tags of one step ``axis`` only (``"epoch"``, or ``"iter"``: the ``iter/`` tags), so that an
    epoch and a global iteration never share a row.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maskrcnn_coco.tracking.backends import step_axis

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"No run folder {run_dir}")
    # size_guidance 0: keep every value (the default samples long series down to 10,000 points).
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {}
    for tag in sorted(acc.Tags()["scalars"]):
        by_step = {event.step: event.value for event in acc.Scalars(tag)}
        scalars[tag] = sorted(by_step.items())
    if not as_dataframe:
        return scalars
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("read_scalars(..., as_dataframe=True) needs pandas: pip install pandas") from None
    columns = {tag: pd.Series(dict(points), dtype="float64") for tag, points in scalars.items() if step_axis(tag) == axis}
    frame = pd.DataFrame(columns)
    frame.index.name = "step"
    return frame.sort_index()
