"""TrainConfig, the one schema of fine-tuning options: its flags, its run.json and its refusals (no torch, no model)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from rapid_diffusion.messages import VALIDATION_REASONS
from rapid_diffusion.serving.cli import main as cli_main
from rapid_diffusion.training.options import (
    PRESETS,
    TrainConfig,
    TrainingError,
    add_arguments,
    config_from_args,
    defaults,
    flag_of,
    name_problem,
    preset_config,
)

# A config in which every option differs from its default, so that each flag is exercised.
EVERY_OPTION_CHANGED = dict(
    base="owner/base", data=Path("pairs.zip"), output=Path("runs/pink"), name="我的粉色", max_steps=321, learning_rate=3e-4,
    batch_size=3, gradient_accumulation_steps=2, resolution=256, train_text_encoder=False, mixed_precision="bf16",
    gradient_checkpointing=True, use_ema=True, use_8bit_adam=False, lr_scheduler="cosine", lr_warmup_steps=7, max_grad_norm=0.5,
    center_crop=False, random_flip=True, seed=11, checkpoint_every=50, keep_checkpoints=3, validation_prompts=["一只猫", "粉色的圆形"],
    holdout=4, validation_every=25, validation_inference_steps=8, resume=True, domain_id="ft-pink", skip_preflight=True,
    knowledge=Path("graph"), knowledge_lr=1e-3, embedding_lr_scale=2.5, snr_gamma=5.0, prior_preservation="strong",
    unet_max_timestep=700,
)


def parser() -> argparse.ArgumentParser:
    wide = argparse.ArgumentParser(prog="train", formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100_000))
    add_arguments(wide)
    return wide


def parse(argv: list[str]) -> TrainConfig:
    return config_from_args(parser().parse_args(argv))


def argv_of(values: dict) -> list[str]:
    """The flags a person would type for ``values`` (written here from argparse's conventions, not from options.py)."""
    argv = []
    for name, value in values.items():
        flag = flag_of(name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            for item in value:
                argv += [flag, item]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def hostile_run_json(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "run.json"
    values = {**json.loads(TrainConfig(base="b", data=Path("d"), output=Path("o")).model_dump_json()), **changes}
    path.write_text(json.dumps(values, ensure_ascii=False), encoding="utf-8")  # json writes NaN as NaN, as Python would
    return path


def test_every_option_has_a_flag_and_help_that_the_train_command_shows():
    fields = TrainConfig.model_fields
    assert set(EVERY_OPTION_CHANGED) == set(fields), "the round-trip config below must set every option"
    help_text = " ".join(parser().format_help().split())
    flags = [flag_of(name) for name in fields]
    assert len(set(flags)) == len(flags) and (flag_of("learning_rate"), flag_of("use_ema")) == ("--lr", "--ema")
    for name, info in fields.items():
        assert info.description and info.description.strip(), f"{name} has no help"
        assert flag_of(name) in help_text
        assert " ".join(info.description.split()) in help_text, f"{name}'s help is not what --help shows"
    assert "(default: 1000)" in help_text and "about 30% slower" in help_text


def test_flags_round_trip_to_the_same_config():
    config = TrainConfig(**EVERY_OPTION_CHANGED)
    assert all(getattr(config, name) != default for name, default in defaults().items()), "every option differs from its default"
    assert parse(argv_of(EVERY_OPTION_CHANGED)) == config
    assert parse(["--base", "b", "--data", "d", "--output", "o"]) == TrainConfig(base="b", data=Path("d"), output=Path("o"))


def test_run_json_round_trips_and_flags_override_it(tmp_path):
    config = TrainConfig(**EVERY_OPTION_CHANGED)
    config.save(tmp_path / "run.json")
    assert TrainConfig.load(tmp_path / "run.json") == config
    assert json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))["name"] == "我的粉色"
    parsed = parse(["--config", str(tmp_path / "run.json"), "--lr", "1e-5", "--no-resume"])
    assert parsed == config.model_copy(update={"learning_rate": 1e-5, "resume": False})


@pytest.mark.parametrize(
    "changes, chinese, english",
    [
        ({"learning_rate": math.nan}, "「learning_rate」无效：须为有限的数（收到 nan）", "Invalid learning_rate: must be a finite number, got nan"),
        ({"max_steps": 1e12}, "「max_steps」无效：须为整数（收到 1000000000000.0）", "Invalid max_steps: must be an integer"),
        ({"max_steps": 10**12}, "「max_steps」无效：须不大于 100000（收到 1000000000000）", "Invalid max_steps: must be at most 100000"),
        ({"steps": 10}, "「steps」无效：未知字段，可用：base, data, output,", "Invalid steps: unknown field; known: base, data, output,"),
        ({"batch_size": "4"}, "「batch_size」无效：须为整数（收到 '4'）", "Invalid batch_size: must be an integer, got '4'"),
        ({"validation_prompts": "一只猫"}, "「validation_prompts」无效：须为列表", "Invalid validation_prompts: must be a list"),
        ({"mixed_precision": "fp8"}, "「mixed_precision」无效：只能是 'no', 'fp16' or 'bf16'（收到 'fp8'）",
         "Invalid mixed_precision: must be one of 'no', 'fp16' or 'bf16', got 'fp8'"),
        ({"name": "a/b"}, "「name」无效：名字不能含控制字符", "Invalid name: the name cannot contain control characters"),
        ({"domain_id": "../etc"}, "「domain_id」无效：格式不符", "Invalid domain_id: must match"),
    ],
)
def test_a_hostile_run_json_is_refused_naming_its_key_chinese_first(tmp_path, changes, chinese, english):
    path = hostile_run_json(tmp_path, **changes)
    with pytest.raises(TrainingError) as failure:
        TrainConfig.load(path)
    message = str(failure.value)
    assert message.startswith(chinese) and f" / {english}" in message
    with pytest.raises(TrainingError, match="^" + chinese.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse(["--config", str(path)])


def test_a_run_json_that_is_not_an_object_of_options_is_refused_by_its_file_name(tmp_path):
    (tmp_path / "run.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(TrainingError, match="^「run.json」无效：不是合法的 JSON.* / Invalid run.json: is not valid JSON"):
        TrainConfig.load(tmp_path / "run.json")
    (tmp_path / "run.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(TrainingError, match="^「run.json」无效：须为 JSON 对象"):
        TrainConfig.load(tmp_path / "run.json")


def test_every_refusal_of_a_hostile_run_json_is_listed_at_once(tmp_path):
    path = hostile_run_json(tmp_path, learning_rate=math.nan, max_steps=1e12, unknown=1, seed="7")
    with pytest.raises(TrainingError) as failure:
        TrainConfig.load(path)
    chinese, english = str(failure.value).split(" / ", 1)
    assert [part.split("」")[0] for part in chinese.split("；")] == ["「max_steps", "「learning_rate", "「seed", "「unknown"]
    assert english.count("; Invalid ") == 3


def test_flags_are_refused_by_the_flag_the_user_typed(capsys):
    base = ["--base", "b", "--data", "d", "--output", "o"]
    with pytest.raises(TrainingError) as failure:
        parse([*base, "--lr", "fast", "--max-steps", "0", "--resolution", "33", "--mixed-precision", "fp8", "--validation-prompt", " "])
    chinese, english = str(failure.value).split(" / ", 1)
    assert chinese.split("；") == [
        "「--max-steps」无效：须不小于 1（收到 '0'）",
        "「--lr」无效：须为数，例如 1e-5（收到 'fast'）",
        "「--resolution」无效：须为 8 的倍数（收到 '33'）",
        "「--mixed-precision」无效：只能是 'no', 'fp16' or 'bf16'（收到 'fp8'）",
        "「--validation-prompt」无效：不能为空白",
    ]
    assert english.startswith("Invalid --max-steps: must be at least 1, got '0'; Invalid --lr: must be a number such as 1e-5")
    with pytest.raises(TrainingError, match="--base"):
        parse(["--data", "d", "--output", "o"])
    assert cli_main(["train", *base, "--snr-gamma", "nan"]) != 0
    assert "「--snr-gamma」无效：须为有限的数" in capsys.readouterr().err


def test_each_refusal_reason_is_in_the_one_table_and_names_are_checked_as_the_model_checks_them():
    """The custom errors of the model's own validators have their sentences in messages.VALIDATION_REASONS."""
    for kind in ("name_blank", "name_too_long", "name_characters", "blank_text"):
        assert kind in VALIDATION_REASONS
    assert name_problem("我的粉色") is None
    assert name_problem("  ") == "请给新模型起个名字 / give the new model a name"
    assert name_problem("长" * 41) == "名字最多 40 个字 / the name has at most 40 characters"
    with pytest.raises(TrainingError, match="^「name」无效：名字最多 40 个字"):
        TrainConfig.checked({"base": "b", "data": "d", "output": "o", "name": "长" * 41})


def test_presets_are_valid_configs_and_the_large_standard_one_is_the_defaults():
    schema = defaults()
    for presets in PRESETS.values():
        for preset in presets.values():
            config = preset_config(preset, base="b", data=Path("d"), output=Path("o"))
            assert {name: getattr(config, name) for name in preset.values()} == preset.values()
    standard = PRESETS["large"]["standard"]
    assert standard.values() == {name: schema[name] for name in standard.values()} == {
        "max_steps": 1000, "learning_rate": 5e-6, "batch_size": 1, "gradient_accumulation_steps": 4}
