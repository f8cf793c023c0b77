"""Every config value checked in one place, before any data or weights are loaded.

Each failure is one sentence naming the key, the value given and what is allowed.
"""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from capsexp.errors import UserError

MIN_IMAGE_SIZE = 32  # below this the 1x1 feature map's BatchNorm statistics degenerate

Check = tuple[str, Callable[[Any], bool], str]


def _int(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if v is None:
            return optional
        if isinstance(v, bool) or not isinstance(v, int):
            return False
        return (lo is None or v >= lo) and (hi is None or v <= hi)
    return ok


def _positive_float(optional: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if v is None:
            return optional
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
    return ok


def _nonneg_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _choice(*options: Any) -> Callable[[Any], bool]:
    return lambda v: v in options


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _unit(v: Any, closed: bool = True) -> bool:
    """A number in [0, 1] (``closed``) or [0, 1)."""
    return _nonneg_float(v) and (v <= 1 if closed else v < 1)


def _betas(v: Any) -> bool:
    return OmegaConf.is_list(v) and len(v) == 2 and all(_unit(b, closed=False) for b in v)


ALARM_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "adapter")


def _stage_list(v: Any) -> bool:
    return OmegaConf.is_list(v) and len(v) > 0 and all(s in ALARM_STAGES for s in v)


COMMON: list[Check] = [
    ("seed", _int(0), "an integer >= 0"),
    # read here so a preset's required value (capsexp_required) fails before anything runs
    ("backbone.weights", lambda v: v is None or isinstance(v, str),
     "null, a torchvision weights name such as IMAGENET1K_V2, or a file path"),
    ("backbone.freeze_depth", _int(0, 5), "an integer from 0 to 5"),
    ("data.image_size", _int(MIN_IMAGE_SIZE), f"an integer >= {MIN_IMAGE_SIZE} (pixels)"),
    ("data.batch_size", _int(1), "a positive integer"),
    ("data.num_workers", _int(0), "an integer >= 0"),
    ("optim.lr", _positive_float(), "a positive number"),
    ("optim.weight_decay", _nonneg_float, "a number >= 0"),
    ("optim.backbone_lr_scale", lambda v: v == "auto" or _nonneg_float(v), "auto or a number >= 0"),
    ("optim.warmup_steps", _int(0), "an integer >= 0"),
    ("optim.scheduler", _choice("cosine", "constant"), "cosine or constant"),
    ("optim.min_lr_ratio", _unit, "a number in [0, 1] (the final fraction of optim.lr)"),
    ("data.download", _bool, "true or false"),
    ("trainer.max_epochs", _int(1, optional=True), "a positive integer or null"),
    ("trainer.max_steps", _int(1, optional=True), "a positive integer or null"),
    ("trainer.limit_train_batches", _int(1, optional=True), "a positive integer or null"),
    ("trainer.limit_val_batches", _int(1, optional=True), "a positive integer or null"),
    ("trainer.log_every_n_steps", _int(1), "a positive integer"),
    ("trainer.warmup_steps_excluded", _int(0), "an integer >= 0"),
    ("trainer.grad_clip", _positive_float(optional=True), "a positive number or null"),
    ("trainer.precision", _choice("auto", "fp32", "bf16", "fp16"), "auto, fp32, bf16 or fp16"),
    ("trainer.channels_last", _choice("auto", True, False), "auto, true or false"),
    ("trainer.compile", _bool, "true or false"),
    ("trainer.on_nonfinite", _choice("stop", "skip"), "stop or skip"),
    ("trainer.progress", _choice("auto", True, False), "auto, true or false"),
    ("grads.enabled", _bool, "true or false"),
    ("grads.per_layer", _bool, "true or false"),
    ("grads.log_every_n_steps", _int(1), "a positive integer"),
    ("grads.histogram_every_n_steps", _int(0), "an integer >= 0 (0 = off)"),
    ("grads.figure_every_n_steps", _int(0), "an integer >= 0 (0 = off)"),
    ("grads.alarm.ratio", _positive_float(), "a positive number"),
    ("grads.alarm.patience", _int(1), "a positive integer"),
    ("grads.alarm.early_stages", _stage_list,
     f"a non-empty list drawn from {', '.join(ALARM_STAGES)}, e.g. [stem,layer1]"),
    ("loss.reconstruction_weight", _nonneg_float, "a number >= 0"),
]

PER_OPTION: dict[str, list[Check]] = {
    "head.capsule": [
        ("head.routing.iterations", _int(1), "an integer >= 1"),
        ("head.routing.detach", _bool, "true or false"),
        ("head.primary.types", _int(1), "a positive integer"),
        ("head.primary.dim", _int(1), "a positive integer"),
        ("head.primary.kernel_size", _int(1), "a positive integer"),
        ("head.primary.stride", _int(1), "a positive integer"),
        ("head.primary.pooled", _bool, "true or false"),
        ("head.class_dim", _int(1), "a positive integer"),
        ("head.init_std", _positive_float(), "a positive number"),
        ("head.share_weights", _bool, "true or false"),
        ("head.decoder.image_size", _int(1), "a positive integer"),
    ],
    "head.fc": [("head.dropout", lambda v: _nonneg_float(v) and v < 1, "a number in [0, 1)")],
    "adapter.conv": [("adapter.width", _int(1), "a positive integer"),
                     ("adapter.norm", _choice("batch", "group", "none"), "batch, group or none"),
                     ("adapter.activation", _choice("relu", "gelu", "silu"), "relu, gelu or silu"),
                     ("adapter.conv3x3", _bool, "true or false")],
    "adapter.linear": [("adapter.width", _int(1), "a positive integer"),
                       ("adapter.activation", _choice("relu", "gelu", "silu"), "relu, gelu or silu")],
    "loss.margin": [("loss.m_plus", _nonneg_float, "a number >= 0"), ("loss.m_minus", _nonneg_float, "a number >= 0"),
                    ("loss.lambda_", _nonneg_float, "a number >= 0")],
    "loss.ce": [("loss.scale", lambda v: v == "learned" or _positive_float()(v), "a positive number or learned"),
                ("loss.label_smoothing", lambda v: _nonneg_float(v) and v < 1, "a number in [0, 1)")],
    "loss.spread": [("loss.m_start", _nonneg_float, "a number >= 0"), ("loss.m_end", _nonneg_float, "a number >= 0")],
    "optim.adamw": [("optim.betas", _betas, "a list of two numbers in [0, 1), e.g. [0.9,0.999]")],
    "optim.sgd": [("optim.momentum", _nonneg_float, "a number >= 0"), ("optim.nesterov", _bool, "true or false")],
}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": value}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False, default="<absent>")


def validate(cfg: DictConfig) -> None:
    """Raise ``UserError`` on the first value that is wrong, with the key, the value and what is allowed."""
    missing = [k for k in ("backbone", "adapter", "head", "loss", "data", "optim", "trainer", "grads")
               if k not in cfg]
    if missing:
        raise UserError(f"the config has no '{missing[0]}' group; compose it from capsexp's conf/ folder.")
    checks = list(COMMON)
    for group in ("head", "adapter", "loss", "optim"):
        checks += PER_OPTION.get(f"{group}.{cfg[group].name}", [])
    for key, ok, allowed in checks:
        value = _get(cfg, key)
        if value == "<absent>":
            raise UserError(f"{key} is missing from the config; it must be {allowed}.")
        if not ok(value):
            raise UserError(f"{key}={value!r} is not allowed; it must be {allowed}.")
    _cross_field(cfg)


def _cross_field(cfg: DictConfig) -> None:
    t = cfg.trainer
    if t.max_epochs is None and t.max_steps is None:
        raise UserError("trainer.max_epochs and trainer.max_steps are both null; set at least one.")
    if t.resume is not None and not isinstance(t.resume, str):
        raise UserError(f"trainer.resume={t.resume!r} is not allowed; it must be a checkpoint path, auto or null.")
    if OmegaConf.is_missing(cfg.data, "root"):  # "???" in the group file: the user must say
        raise UserError(f"data.root is required for data={cfg.data.name}; pass data.root=/path/to/images.")
    if cfg.data.name == "imagefolder" and not 0 < float(cfg.data.val_fraction) < 1:
        raise UserError(f"data.val_fraction={cfg.data.val_fraction!r} is not allowed; it must be in (0, 1).")
    if cfg.loss.name == "margin" and not cfg.loss.m_minus < cfg.loss.m_plus:
        raise UserError(f"loss.m_minus={cfg.loss.m_minus} must be below loss.m_plus={cfg.loss.m_plus}.")
