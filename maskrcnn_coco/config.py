"""Typed structured configs, registered with Hydra's ConfigStore.

Every YAML file in ``conf/`` starts from one of these schemas (``defaults: [<schema>, _self_]``), so a
misspelt key or a value of the wrong type fails when the config is composed, with Hydra's message
naming the key, before any data or model is built. A value of the right type that cannot work (a
negative lr, an unknown choice) breaks the rule written beside its field (``field(metadata=rule(...))``):
``validate_config`` names it, also before any data or model is built.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from maskrcnn_coco.utils.errors import ConfigError


def config_dir() -> Path:
    """The shipped ``conf/`` folder: the repository's top-level ``conf/`` in a checkout (editable
    install), else the copy packaged inside the wheel as ``maskrcnn_coco/conf``."""
    repo = Path(__file__).resolve().parents[1]
    checkout = repo / "conf"
    # pyproject.toml marks a checkout: in site-packages, parents[1]/conf could be another package's.
    if (checkout / "config.yaml").is_file() and (repo / "pyproject.toml").is_file():
        return checkout
    packaged = Path(str(importlib.resources.files("maskrcnn_coco") / "conf"))
    if (packaged / "config.yaml").is_file():
        return packaged
    raise FileNotFoundError(f"maskrcnn_coco's conf/ folder is missing (looked in {checkout} and {packaged}); reinstall the package")


# What the entry point returns to a sweeper unless objective.metric says otherwise.
DEFAULT_OBJECTIVE = "mAP/segm_AP"

LOSS_COMPONENTS: tuple[str, ...] = (
    "loss_classifier",
    "loss_box_reg",
    "loss_mask",
    "loss_objectness",
    "loss_rpn_box_reg",
)


# -------------------------------------------------------------------------------- value rules
# Choices implemented elsewhere (engine.settings.AMP_DTYPES, evaluation.coco_eval.BACKENDS), defined here,
# at the bottom of the package, so that those modules and the value rules share one list.
AMP_MODES: tuple[str, ...] = ("off", "bf16", "fp16")
EVAL_BACKENDS: tuple[str, ...] = ("auto", "pycocotools", "faster_coco_eval")
EXIF_POLICIES = ("apply", "ignore")
CROWD_POLICIES = ("ignore", "train")
DATA_LAYOUTS = ("auto", "coco2017", "roboflow", "cvat")
# How the optimizer's step runs (solver.param_groups.implementation_kwargs): one fused kernel per parameter
# list, torch's multi-tensor (foreach) ops, or a Python loop over parameters. auto: fused where it exists.
OPTIMIZER_IMPLS: tuple[str, ...] = ("auto", "fused", "foreach", "for_loop")


@dataclass(frozen=True)
class Rule:
    """What a config value must be: ``ok(value)`` holds for a non-null value, said as ``must``.
    ``null``: null is allowed too (True, or a string saying what null means)."""

    ok: Callable[[Any], bool]
    must: str
    null: bool | str = False

    @property
    def expected(self) -> str:
        if self.null is True:
            return f"{self.must} (or null)"
        return f"{self.must} (or null: {self.null})" if self.null else self.must


def rule(ok: Callable[[Any], bool], must: str, null: bool | str = False) -> dict[str, Rule]:
    """A field's metadata holding its value rule: ``x: int = field(default=1, metadata=rule(...))``."""
    return {"rule": Rule(ok, must, null)}


def at_least(low: int, must: str | None = None, null: bool | str = False) -> dict[str, Rule]:
    return rule(lambda v: v >= low, must or f"at least {low}", null)


def positive(null: bool | str = False) -> dict[str, Rule]:
    return rule(lambda v: v > 0, "positive", null)


def one_of(choices: tuple[str, ...]) -> dict[str, Rule]:
    return rule(lambda v: v in choices, f"one of {', '.join(choices)}")


def is_probability(v: float) -> bool:
    return 0.0 <= v <= 1.0


def validate_config(cfg: Any, schema: type | None = None, prefix: str = "") -> None:
    """One ``ConfigError`` (``key=value: must be ...``) naming the first value that breaks the rule of
    its field, walking the typed schema: ``cfg``'s own dataclass (e.g. ``ShapesDataConfig`` under
    ``data``), else ``schema`` (``Config`` at the top). Keys left at ``???`` are not looked at here."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    node_type = OmegaConf.get_type(cfg)
    schema = node_type if isinstance(node_type, type) and is_dataclass(node_type) else schema or Config
    hints = get_type_hints(schema)
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        if f.name in cfg and OmegaConf.is_missing(cfg, f.name):
            continue
        value = cfg.get(f.name)
        hint = hints.get(f.name)
        if isinstance(hint, type) and is_dataclass(hint):
            if isinstance(value, DictConfig):
                validate_config(value, hint, f"{key}.")
            continue
        check: Rule | None = f.metadata.get("rule")
        if check is None:
            continue
        if value is None:
            if check.null is False:
                raise ConfigError(f"{key}=null: must be {check.expected}")
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        try:
            ok = bool(check.ok(value))
        except (TypeError, ValueError, IndexError):
            ok = False
        if not ok:
            raise ConfigError(f"{key}={value}: must be {check.expected}")


# --------------------------------------------------------------------------------------- data
@dataclass
class AugmentConfig:
    """Box- and mask-aware training augmentation (torchvision.transforms.v2)."""

    hflip_prob: float = field(default=0.5, metadata=rule(is_probability, "a probability in [0, 1]"))
    vflip_prob: float = field(default=0.0, metadata=rule(is_probability, "a probability in [0, 1]"))
    photometric: bool = False
    # Random zoom-out then crop back ("scale jitter"), as (min_scale, max_scale); null disables it.
    scale_range: Optional[List[float]] = field(default=None, metadata=rule(
        lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[min, max] with 0 < min <= max, e.g. [0.8,1.2]", null=True))


@dataclass
class DataConfig:
    name: str = MISSING
    batch_size: int = field(default=4, metadata=at_least(1))
    val_batch_size: Optional[int] = field(default=None, metadata=at_least(1, null="same as data.batch_size"))
    # Loader worker processes, or auto: from the CPU count (resolve_num_workers). Training workers
    # persist across epochs, validation workers live through one evaluation.
    num_workers: Any = field(default=0, metadata=rule(
        lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0), "0 or more, or auto"))
    # Training batches of one aspect-ratio group (portrait/landscape and finer, from the annotation file's
    # image sizes; no image is decoded), as torchvision's --aspect-ratio-group-factor: the bins are
    # 2 ** linspace(-1, 1, 2k + 1); -1 disables. A set of one group (shapes) trains in the plain order.
    aspect_ratio_group_factor: int = 3
    # Images with no (non-crowd) annotation: dropped from training (torchvision's reference recipe),
    # always kept for validation so COCO metrics cover the whole split.
    drop_empty_train_images: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Use only the first N images of a split (quick experiments); null uses all.
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None
    # Images that are missing, cannot be decoded (e.g. truncated) or whose size differs from the
    # annotation file: error (stop, naming the file and image id: missing files when the dataset is
    # built, the others when first loaded) | drop (decode every image once at build, in threads, and
    # skip the bad ones with a warning; costs one full decode of the split per run).
    on_invalid: str = "error"
    # EXIF orientation (phone photos): apply = load images as displayed, as annotation tools show them
    # (an image whose annotation size matches only its raw frame is loaded raw, with one line saying so);
    # ignore = always the raw pixel frame.
    exif: str = field(default="apply", metadata=rule(lambda v: v in EXIF_POLICIES, "apply or ignore"))
    # iscrowd=1 annotations: ignore = COCO semantics (not trained; COCOeval ignores detections on them);
    # train = ordinary instances in training and evaluation (CVAT's "COCO 1.0" marks every mask-drawn
    # object as a crowd RLE).
    crowd: str = field(default="ignore", metadata=rule(lambda v: v in CROWD_POLICIES, "ignore or train"))
    # The validated index of each split (data.index_cache; built once, then memory-mapped by every rank
    # and worker of the node): auto = beside the annotation file, or under the cache folder when that
    # one is read-only | off = validate and index at every start | a folder to keep the indexes in.
    index_cache: str = "auto"


@dataclass
class CocoDataConfig(DataConfig):
    name: str = "coco"
    root: str = MISSING
    train_images: str = "${.root}/train2017"
    val_images: str = "${.root}/val2017"
    train_annotations: str = "${.root}/annotations/instances_train2017.json"
    val_annotations: str = "${.root}/annotations/instances_val2017.json"
    # Where the files are under data.root: auto (COCO 2017's layout when its files exist, else
    # Roboflow's train/_annotations.coco.json or CVAT's annotations/instances_default.json + images/,
    # recognised from data.root) | coco2017 | roboflow | cvat. Explicit data.*_images/_annotations win.
    layout: str = field(default="auto", metadata=rule(lambda v: v in DATA_LAYOUTS, "auto, coco2017, roboflow or cvat"))
    # Split one annotation file (data.train_annotations) into train and val: this fraction of its
    # images (deterministic from image ids and data.split_seed) becomes val; data.val_annotations is
    # then unused. null: the two files as given.
    val_fraction: Optional[float] = field(default=None, metadata=rule(lambda v: 0 < v < 1, "between 0 and 1, e.g. 0.1", null=True))
    split_seed: int = 0


@dataclass
class ShapesDataConfig(DataConfig):
    name: str = "shapes"
    num_train: int = 1000
    num_val: int = 80
    image_size: int = 128
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 4
    # Generated once per parameter set under <cache_dir>/<hash>/, reused afterwards.
    cache_dir: str = "${oc.env:MASKRCNN_COCO_CACHE,'~/.cache/maskrcnn_coco'}/shapes"


# -------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    # small | maskrcnn_r50_fpn | maskrcnn_r50_fpn_v2
    arch: str = MISSING
    # A torchvision weights name (e.g. DEFAULT, COCO_V1) or a local file (state dict or checkpoint).
    weights: Optional[str] = None
    # Backbone-only weights: a torchvision name (e.g. DEFAULT, IMAGENET1K_V1) or a local file.
    backbone_weights: Optional[str] = None
    # ResNet stages left trainable (0-5); null: torchvision's choice (3 with weights, else 5).
    trainable_backbone_layers: Optional[int] = None
    min_size: int = 800
    max_size: int = 1333
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    # At most this share of the sampled RoIs are positives (the mask head trains on these alone).
    box_positive_fraction: float = field(default=0.25, metadata=rule(lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.25"))
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    # RoIAlign of the RoI heads: auto = one sparse matrix product per pooler when training on CPU
    # (torchvision's CPU backward was 36% of an iteration; same values), torchvision's kernel elsewhere;
    # torchvision = always torchvision's kernel.
    roi_align: str = "auto"


@dataclass
class SmallModelConfig(ModelConfig):
    """A CPU-sized Mask R-CNN: ResNet body, narrow FPN, light heads, trainable BatchNorm."""

    arch: str = "small"
    backbone: str = "resnet18"
    returned_layers: List[int] = field(default_factory=lambda: [2, 3, 4])
    fpn_channels: int = 64
    # One anchor size per FPN level (returned layers + the max-pool level).
    anchor_sizes: List[int] = field(default_factory=lambda: [24, 48, 96, 192])
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    box_head_dim: int = 256
    mask_head_layers: List[int] = field(default_factory=lambda: [64, 64])
    mask_predictor_dim: int = 64
    # Bilinear samples per RoIAlign bin side (torchvision: 2). 1 makes RoIAlign's backward, the
    # costliest op of a CPU iteration here, 4x cheaper.
    roi_sampling_ratio: int = 2
    # batchnorm (trainable, from scratch) | frozen (torchvision's FrozenBatchNorm2d, for pretrained)
    norm: str = "batchnorm"


# ---------------------------------------------------------------------------------- optimizer
def default_param_groups(head_lr_multiplier: Any = 1.0) -> Dict[str, Dict[str, Any]]:
    """The default parameter groups (the one definition): backbone and rpn at lr, roi_heads at
    lr * head_lr_multiplier. The config passes the interpolation ``${optimizer.head_lr_multiplier}``."""
    return {
        "backbone": {"prefixes": ["backbone"], "lr_mult": 1.0},
        "rpn": {"prefixes": ["rpn"], "lr_mult": 1.0},
        "heads": {"prefixes": ["roi_heads"], "lr_mult": head_lr_multiplier},
    }


@dataclass
class OptimizerConfig:
    lr: float = field(default=0.02, metadata=positive())
    # Multiplier of lr for the box and mask heads (the `heads` group).
    head_lr_multiplier: float = 1.0
    weight_decay: float = 1e-4
    # Norm-layer weights and all biases get no weight decay (detectron2's recipe).
    no_weight_decay_norm_bias: bool = True
    clip_grad_norm: Optional[float] = field(default=None, metadata=positive(null=True))
    # name -> {prefixes: [module-name prefixes], lr_mult: float, weight_decay: float|null}. Untyped
    # here so that a new group can be added from the command line
    # ('+optimizer.groups.mask_head={prefixes:[...],lr_mult:30}'); get_parameter_groups checks the keys.
    groups: Dict[str, Any] = field(default_factory=lambda: default_param_groups("${optimizer.head_lr_multiplier}"))
    # A torch.optim class as a Hydra partial, completed in code with params and lr. Empty here so
    # that the keys of one optimizer file (SGD's momentum) never leak into another (AdamW).
    factory: Dict[str, Any] = field(default_factory=dict)
    # The optimizer's implementation: auto (fused where the class and every parameter's device support
    # it, else torch's default) | fused | foreach | for_loop. A fused/foreach key in factory wins.
    impl: str = field(default="auto", metadata=one_of(OPTIMIZER_IMPLS))
    # none: lr as given, whatever the number of processes; linear: lr * total batch / reference_batch_size
    # (total batch = data.batch_size x world size), so a recipe keeps its per-image step size.
    scale_lr: str = field(default="none", metadata=rule(lambda v: v in ("none", "linear"), "none or linear"))
    reference_batch_size: int = field(default=16, metadata=at_least(1))


@dataclass
class SchedulerConfig:
    # constant | multistep | cosine (after the linear warmup)
    name: str = "multistep"
    warmup_iters: int = field(default=250, metadata=at_least(0, "0 or more"))
    warmup_factor: float = 0.001
    # multistep: epochs (fractions allowed) at which lr is multiplied by gamma.
    milestones: List[float] = field(default_factory=list)
    gamma: float = 0.1
    # cosine: final lr as a fraction of the base lr.
    min_lr_factor: float = 0.0


# ------------------------------------------------------------------------------ other groups
@dataclass
class TrackerConfig:
    """Tracker backends: each a Hydra partial called with ``log_dir=<run folder>``."""

    backends: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LossWeightsConfig:
    loss_classifier: float = 1.0
    loss_box_reg: float = 1.0
    loss_mask: float = 1.0
    loss_objectness: float = 1.0
    loss_rpn_box_reg: float = 1.0


@dataclass
class LossConfig:
    weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)


@dataclass
class EvalConfig:
    every_n_epochs: int = field(default=1, metadata=at_least(1))
    val_loss: bool = True
    # A pixel is in a predicted mask above this probability (0 <= t < 1: below 0 every pixel outside
    # a detection's box would be foreground).
    mask_threshold: float = field(default=0.5, metadata=rule(lambda v: 0 <= v < 1, "between 0 (included) and 1, e.g. 0.5"))
    # COCOeval implementation: auto (faster_coco_eval when installed) | pycocotools | faster_coco_eval.
    backend: str = field(default="auto", metadata=one_of(EVAL_BACKENDS))
    # Evaluate epochs before the last on a fixed subset of N val images (the same images every time,
    # drawn once from the run's seed); the last epoch on the full set. null: the full set every time.
    subset: Optional[int] = field(default=None, metadata=at_least(1, null="the full set every time"))


@dataclass
class CheckpointConfig:
    # epoch_NNN.pth every N epochs (0: none); last.pth is written every epoch regardless.
    every_n_epochs: int = field(default=1, metadata=at_least(0, "0 (no epoch_NNN.pth) or more"))
    # Keep the newest N epoch_NNN.pth files (null: all). last.pth and best.pth are always kept.
    keep_last: Optional[int] = field(default=2, metadata=at_least(1, null="keep all"))
    # Also write last.pth every N optimizer steps inside an epoch (long epochs on preemptible nodes).
    every_n_iters: Optional[int] = field(default=None, metadata=at_least(1, null=True))


@dataclass
class TrainConfig:
    # Stop like on a NaN when the optimised loss exceeds max_loss, or max_loss_factor times the run's
    # first iteration's loss (null disables either); no checkpoint is written from diverged weights.
    max_loss: Optional[float] = field(default=None, metadata=positive(null=True))
    max_loss_factor: Optional[float] = field(default=1.0e4, metadata=rule(lambda v: v > 1, "above 1", null=True))
    # Distributed runs (torchrun / SLURM): BatchNorm statistics synchronised across processes (CUDA only).
    sync_bn: bool = False
    # Mixed precision: off | bf16 | fp16 | auto (autocast of the forward pass, on CUDA and CPU; fp16 adds a
    # GradScaler, checkpointed with the run; bf16 needs none). auto: bf16 on a CPU with native bf16
    # (AVX512-BF16/AMX), else off (cli/experiment.py resolve_amp).
    amp: str = field(default="auto", metadata=rule(
        lambda v: v == "auto" or v in AMP_MODES, f"auto or one of {', '.join(AMP_MODES)}"))
    # Gradient norms (grad_norm/<group>, grad_norm/module.<name>) measured every N iterations; the logged
    # value is their mean over the measured iterations of the epoch (10: 25 samples of a 250-iteration epoch).
    grad_norm_every: int = field(default=10, metadata=at_least(1))
    # The model in channels_last memory format (convolutions in NHWC).
    channels_last: bool = False


@dataclass
class ObjectiveConfig:
    """What the entry point returns to a Hydra sweeper."""

    metric: str = DEFAULT_OBJECTIVE
    mode: str = "final"  # final | best (max over epochs)


@dataclass
class DiagnosticsConfig:
    """What the framework says by itself about the failing part of the detector
    (``maskrcnn_coco.analysis.audit`` at start, ``maskrcnn_coco.analysis.diagnostics`` after each epoch)."""

    enabled: bool = True
    # Monitors look at no epoch before this one, and a pattern must hold this many consecutive epochs.
    min_epoch: int = 2
    patience_epochs: int = 2
    # Trend monitors (rising, stalled, at chance, train/val gap) skip epochs that start before this many
    # optimizer steps: warmup and the first steps are a transient (loss_box_reg rises while the RPN
    # starts producing positives), and tiny runs never get past it.
    min_steps: int = 100
    # A weighted component at least this many times the median of the other optimised weighted components,
    # and more than `dominance_share` of the optimised loss, is dominant: the run's monitors (epoch means,
    # for patience_epochs) and the loss probe (one batch) apply this one rule (`diagnostics.dominance`).
    dominance_factor: float = 10.0
    dominance_share: float = 0.5
    # |loss - chance| / chance within this fraction counts as "at its chance value".
    chance_tolerance: float = 0.05
    # Relative change per epoch: a component falls when it drops by more than `fall_rel`, rises when it
    # grows by more than `rise_rel`; "the others fall" means their median drop over the window exceeds `others_fall_rel`.
    fall_rel: float = 0.02
    rise_rel: float = 0.05
    others_fall_rel: float = 0.20
    # Start-of-run audit: a producer at less than this fraction of the largest group lr is effectively frozen.
    min_lr_ratio: float = 0.01
    # Anchor fit: warn when more than `anchor_unreachable_share` of the objects (the training set at the start
    # of a run, the probed split in the loss probe) cannot reach the RPN's positive IoU (0.7) with any anchor
    # AND that share exceeds the best one-size-per-level anchors' share by `anchor_excess_share` (octave-spaced
    # anchors always leave some 40% of a size range below 0.7). One rule: `audit.anchor_misfit`.
    anchor_unreachable_share: float = 0.5
    anchor_excess_share: float = 0.1
    # The anchor fit is judged on at least this many training objects (a 24-image set says little).
    anchor_min_objects: int = 200
    # Loss probe (one batch at a time): a would-be dominant component within `probe_chance_factor` x its
    # chance value, at a weight no larger than the others', is a fresh predictor's starting point (info);
    # RPN positives at `probe_saturation_share` x the sampler's positive_fraction or more saturate it;
    # fewer sampled RoI proposals than `probe_collapse_share` x box_batch_size_per_image x images collapse.
    probe_chance_factor: float = 1.25
    probe_saturation_share: float = 0.9
    probe_collapse_share: float = 0.25
    # Per-class: a class AP below `class_ap_ratio` x the median class AP (when that median exceeds
    # `class_ap_min_median`); a ground-truth class whose matched detections (at least
    # `confusion_min_matches`) are mostly (> `confusion_off_share`) another class.
    class_ap_ratio: float = 0.5
    class_ap_min_median: float = 0.1
    confusion_min_matches: int = 5
    confusion_off_share: float = 0.5
    # Iteration-level spikes (checked at each read-back, every print_freq iterations): a window's largest
    # total loss at least `spike_loss_factor` x the run's lowest window mean, or a measured gradient norm
    # at least `spike_grad_factor` x the median of its recent window means. 0 turns a check off.
    spike_loss_factor: float = 5.0
    # Healthy default runs peaked at 8.4 (epoch 1, norms still growing fast); a diverging lr gives 100x and more.
    spike_grad_factor: float = 20.0
    # Relative progress: a component whose fall since its first settled epoch (log ratio) is below
    # `lag_ratio` x the median fall of the other optimised components lags them (healthy short runs:
    # >= 0.75; a mask head at 1/30 of the heads' lr: 0.5). Judged from `lag_min_epoch`.
    lag_ratio: float = 0.6
    lag_min_epoch: int = 3
    # Metric disparity: segm AP50 / bbox AP50 outside [disparity_low, 1 / disparity_low] names the mask
    # (or box) branch (healthy short runs: 0.9-1.05; masks off their objects: 0.05); APs vs APl likewise.
    disparity_low: float = 0.6
    disparity_min_ap50: float = 0.2
    # Validation unlike training at the first evaluation: a component's val/train ratio above this.
    first_eval_ratio: float = 1.6
    # Finding kinds (e.g. lagging_class), subjects (class or module names) or kind:subject pairs not
    # to report; said once at start.
    ignore: List[str] = field(default_factory=list)
    # Per-image losses at each evaluation on a fixed subset of this many training images (0: off;
    # 24 cost 1.2-1.6 % of a default epoch): images above median + k x MAD and min_ratio x the median
    # are "annotations to check" (engine/per_image.py).
    per_image_images: int = field(default=24, metadata=at_least(0))
    per_image_k_mad: float = 5.0
    per_image_min_ratio: float = 2.0
    # The label check (engine/label_check.py): at each evaluation, the box classifier's verdict on the
    # annotated objects of this many training and as many validation images (0: off); training labels
    # that agree with it less often than validation's are "training_labels".
    label_check_images: int = field(default=64, metadata=at_least(0))


@dataclass
class VisConfig:
    """Images of predictions at each evaluation (engine/visualize.py): fixed validation images drawn as
    ground truth beside predictions, in <run folder>/vis/ and the trackers' images."""

    # Validation images drawn (chosen once from the seed; 0: off, no prediction or confusion images).
    num_images: int = field(default=4, metadata=at_least(0))
    # Detections drawn: score at least this, at most max_detections of them (the best).
    score_threshold: float = field(default=0.5, metadata=rule(is_probability, "a probability in [0, 1]"))
    max_detections: int = field(default=20, metadata=at_least(1))


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tracker: TrackerConfig = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    vis: VisConfig = field(default_factory=VisConfig)
    epochs: int = field(default=10, metadata=at_least(1))
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Resume from a checkpoint (e.g. runs/maskrcnn/<run>/checkpoints/last.pth), or auto: the newest
    # last.pth/interrupted.pth under <runs_dir>/maskrcnn (none: start fresh).
    resume: Optional[str] = None
    # Iterations between progress-bar loss updates (each one is a device sync).
    print_freq: int = field(default=20, metadata=at_least(1))
    progress: bool = True
    runs_dir: str = "runs"
    # Extra step hooks, one entry each: hooks.<name>={_target_: my_pkg.MyHook, ...} (a subclass of
    # maskrcnn_coco.engine.hooks.Hook), run after the default instruments (README: "Adding an instrument").
    hooks: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schemas that the YAML files in ``conf/`` extend."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="data", name="shapes_schema", node=ShapesDataConfig)
    cs.store(group="data", name="coco_schema", node=CocoDataConfig)
    cs.store(group="model", name="small_schema", node=SmallModelConfig)
    cs.store(group="model", name="torchvision_schema", node=ModelConfig)
    cs.store(group="optimizer", name="optimizer_schema", node=OptimizerConfig)
    cs.store(group="tracker", name="tracker_schema", node=TrackerConfig)
