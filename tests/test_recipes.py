"""cct.recipes: the named recipes, and the one place where training options are range-checked."""
from dataclasses import replace

import pytest

from cct.errors import CCTError
from cct.recipes import RECIPES, TrainConfig, make_config, parse_res_schedule, validate
from cct.runtime import DEVICES, PRECISIONS


def test_keras_recipe_is_the_example():
    cfg = make_config("cct_2_3x2_32_keras", "cifar10", "out")
    assert cfg.recipe == "keras"
    assert (cfg.lr, cfg.weight_decay, cfg.eps, cfg.label_smoothing, cfg.batch_size, cfg.epochs, cfg.val_split) == \
        (1e-3, 1e-4, 1e-7, 0.1, 128, 30, 0.1)
    assert cfg.weight_decay_all and cfg.hflip and cfg.normalize == "none" and cfg.restore_best
    paper = make_config("cct_7_3x1_32", "cifar10", "out")
    assert paper.recipe == "paper" and paper.rand_augment == "rand-m9-mstd0.5-inc1" and paper.mix_off_epoch == 175
    assert make_config("cct_7_3x1_32", "d", "o", "fast", epochs=3).epochs == 3
    assert set(RECIPES) == {"keras", "paper", "fast", "finetune", "text"}


def test_paper_and_fast_recipes_are_what_the_readme_says():
    """The README's recipe table, value by value: the official cct_7-3x1 CIFAR-10 yml, and the fast recipe's choices."""
    paper = make_config("cct_7_3x1_32", "cifar10", "out")
    assert (paper.lr, paper.weight_decay, paper.weight_decay_all, paper.warmup_epochs, paper.warmup_lr, paper.min_lr,
            paper.epochs, paper.cooldown_epochs, paper.batch_size, paper.schedule) == \
        (5.5e-4, 0.06, False, 10, 1e-5, 1e-5, 310, 10, 128, "cosine")
    assert (paper.rrc_scale, paper.hflip, paper.mixup_alpha, paper.cutmix_alpha, paper.mix_prob, paper.switch_prob,
            paper.mix_mode, paper.label_smoothing, paper.normalize) == \
        ((0.8, 1.0), True, 0.8, 1.0, 1.0, 0.5, "batch", 0.1, "cifar")
    fast = make_config("cct_2_3x5_32", "cifar10", "out", "fast")
    assert (fast.batch_size, fast.warmup_epochs, fast.lr, fast.optimizer, fast.weight_decay, fast.label_smoothing,
            fast.translate, fast.alternate_flip, fast.normalize, fast.val_split, fast.tta, fast.tta_translate) == \
        (64, 1, 3e-3, "muon", 0.05, 0.1, 2, True, "dataset", 0.0, True, 1)
    assert (fast.drop_rate, fast.attn_drop_rate, fast.drop_path_rate, fast.cutmix_alpha, fast.mix_prob,
            fast.mix_min_epochs, fast.res_schedule) == (0.0, 0.0, 0.05, 1.0, 0.5, 15, "0.5@0,0.75@0.43,1@0.71")


def test_make_config_refuses_unknown_names():
    with pytest.raises(CCTError, match="unknown recipe 'nope'"):
        make_config("cct_2_3x2_32", "d", "o", "nope")
    with pytest.raises(CCTError, match="unknown training option.*frobnicate"):
        make_config("cct_2_3x2_32", "d", "o", frobnicate=1)


@pytest.mark.parametrize("override, message", [
    ({"procs": -1}, "--procs must be 0 (one per core) or positive"),
    ({"precision": "fp64"}, "--precision must be one of auto, fp32, bf16, fp16"),
    ({"device": "tpu"}, "--device must be one of auto, cpu, cuda"),
    ({"stream_threshold": 0.0}, "--stream-threshold must be in (0, 1]"),
    ({"rrc_scale": (0.9, 0.5)}, "--rrc-scale must satisfy"),
    ({"res_schedule": "0.5,1@0.5"}, "--res-schedule: '0.5' is not SCALE@START"),
    ({"res_schedule": "0.5@0.1,1@0.5"}, "must start at 0 and at increasing fractions below 1"),
    ({"res_schedule": "0.5@0,0.75@0.5,1@0.4"}, "must start at 0 and at increasing fractions below 1"),
    ({"res_schedule": "0.5@0,1@1"}, "must start at 0 and at increasing fractions below 1"),
    ({"res_schedule": "0@0,1@0.5"}, "scales must be in (0, 1], the last 1"),
    ({"res_schedule": "0.5@0,0.75@0.5"}, "scales must be in (0, 1], the last 1"),
    ({"res_schedule_max_cost": 0.0}, "--res-schedule-max-cost must be positive"),
    ({"mix_min_epochs": -1.0}, "--mix-min-epochs must be non-negative"),
    ({"alternate_flip": True, "hflip": False}, "--alternate-flip decides how --hflip flips; it needs --hflip"),
    ({"warmup_epochs": float("inf")}, "--warmup-epochs must be a finite number, got inf"),
    ({"weight_decay": float("inf")}, "--weight-decay must be a finite number, got inf"),
    ({"min_lr": float("inf")}, "--min-lr must be a finite number, got inf"),
    ({"cutmix_alpha": float("inf")}, "--cutmix-alpha must be a finite number"),
    ({"seed": -5}, "--seed must be in [0, 2**32), got -5"),
    ({"seed": 2 ** 32}, "--seed must be in [0, 2**32)"),
    ({"img_size": 2}, "--img-size must be at least 8 pixels, got 2"),
    ({"mix_off_epoch": -3}, "--mix-off-epoch must be non-negative, got -3"),
])
def test_validate_says_what_is_wrong(override, message):
    validate(make_config("cct_2_3x2_32", "d", "o"))
    with pytest.raises(CCTError) as info:
        validate(make_config("cct_2_3x2_32", "d", "o", **override))
    assert message in str(info.value)


def test_res_schedule_parses_and_is_for_images():
    assert parse_res_schedule("0.5@0, 0.75@0.4,1@0.7") == [(0.0, 0.5), (0.4, 0.75), (0.7, 1.0)]
    assert parse_res_schedule("1@0") == [(0.0, 1.0)]  # full size throughout
    fast = make_config("cct_2_3x2_32", "d", "o", "fast")
    assert fast.optimizer == "muon" and make_config("cct_2_3x2_32_keras", "d", "o", "keras").optimizer == "adamw"
    assert (fast.res_schedule, fast.res_schedule_max_cost) == ("0.5@0,0.75@0.43,1@0.71", 0.6)
    # the limit is for the recipe's own schedule: one asked for runs, unless a limit is asked for too
    assert make_config("cct_2_3x2_32", "d", "o", "fast", res_schedule="0.5@0,1@0.5").res_schedule_max_cost is None
    assert make_config("cct_2_3x2_32", "d", "o", "fast", res_schedule="0.5@0,1@0.5",
                       res_schedule_max_cost=0.7).res_schedule_max_cost == 0.7
    # so is the fast recipe's mixing threshold: mixing asked for runs at any length, unless a threshold is asked for
    assert (fast.cutmix_alpha, fast.mix_prob, fast.mix_min_epochs) == (1.0, 0.5, 15)
    # the alternating flip is how the fast recipe flips: --no-hflip turns it off with the flips
    assert fast.alternate_flip and not make_config("cct_2_3x2_32_keras", "d", "o", "keras").alternate_flip
    no_flips = make_config("cct_2_3x2_32", "d", "o", "fast", hflip=False)
    assert not no_flips.alternate_flip
    validate(no_flips)
    for asked in ({"cutmix_alpha": 1.0}, {"mixup_alpha": 0.2}, {"mix_prob": 1.0}):
        assert make_config("cct_2_3x2_32", "d", "o", "fast", **asked).mix_min_epochs is None
    assert make_config("cct_2_3x2_32", "d", "o", "fast", mixup_alpha=0.2, mix_min_epochs=5).mix_min_epochs == 5
    with pytest.raises(CCTError, match="--res-schedule is for image models, and text_cct_2 is a text model"):
        make_config("text_cct_2", "d", "o", res_schedule="0.5@0,1@0.5")
    with pytest.raises(CCTError, match="--res-schedule .progressive resizing. is for image models"):  # a config made
        validate(replace(make_config("text_cct_2", "d", "o"), res_schedule="0.5@0,1@0.5"))  # without make_config


def test_rand_augment_none_turns_the_recipes_policy_off():
    assert make_config("cct_7_3x1_32", "d", "o", "paper").rand_augment == "rand-m9-mstd0.5-inc1"
    for off in ("none", "None", ""):
        cfg = make_config("cct_7_3x1_32", "d", "o", "paper", rand_augment=off)
        assert cfg.rand_augment is None and cfg.auto_augment is False
        validate(cfg)


def test_choices_come_from_runtime():
    fields = TrainConfig.__dataclass_fields__
    assert fields["precision"].metadata["choices"] is PRECISIONS and fields["device"].metadata["choices"] is DEVICES


def test_config_round_trips_through_a_dict():
    cfg = make_config("cct_7_3x1_32", "d", "o", "paper")
    assert TrainConfig.from_dict({**cfg.to_dict(), "a_field_of_a_later_version": 1}) == cfg


def test_validate_names_the_recipes_own_setting_and_options_a_model_lacks():
    with pytest.raises(CCTError, match=r"not both \(the paper recipe sets --rand-augment rand-m9-mstd0.5-inc1: add "
                                       r"--rand-augment none\)"):
        validate(make_config("cct_2_3x2_32", "d", "o", "paper", auto_augment=True))
    with pytest.raises(CCTError, match="--kernel-size: text_transformer_2 has no convolution"):
        validate(make_config("text_transformer_2", "d", "o", kernel_size=2))
