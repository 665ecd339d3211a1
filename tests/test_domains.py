from pathlib import Path

import pytest

from rapid_diffusion.domains import DomainSpecError, ModelSource, load_domain_file, load_domains
from rapid_diffusion.paths import PROJECT_ROOT

from conftest import write_domain


def test_shipped_domains_are_valid_and_listed():
    specs = load_domains([PROJECT_ROOT / "domains"])
    assert {"ecommerce", "guohua", "food"} <= set(specs)
    food = specs["food"]
    assert food.model.repo_id == "alibaba-pai/pai-diffusion-food-large-zh"
    assert food.sampler == "pndm"
    for spec in specs.values():
        assert len(spec.examples) >= 3
        assert all(any("\u4e00" <= ch <= "\u9fff" for ch in e) for e in spec.examples)
        assert spec.title_zh and spec.title_en and spec.description


def test_local_model_path_is_relative_to_the_yaml(tmp_path):
    path = write_domain(tmp_path, "mine", Path("models/mine"))
    assert load_domain_file(path).model.path == (tmp_path / "models" / "mine").resolve()


@pytest.mark.parametrize(
    "override, field",
    [
        ({"sampler": "'magic'"}, "sampler"),
        ({"height": 100}, "height"),
        ({"num_inference_steps": "'many'"}, "num_inference_steps"),
        ({"guidance_scale": 99}, "guidance_scale"),
        ({"colour": "'red'"}, "colour"),
        ({"id": "'Bad Id'"}, "id"),
    ],
)
def test_invalid_field_is_named_with_the_file(tmp_path, override, field):
    path = write_domain(tmp_path, "bad", Path("m"))
    text = path.read_text(encoding="utf-8")
    for key, value in override.items():
        lines = [line for line in text.splitlines() if not line.startswith(f"{key}:")]
        text = "\n".join(lines + [f"{key}: {value}"])
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DomainSpecError) as info:
        load_domain_file(path)
    assert info.value.field_name == field
    assert str(path) in str(info.value)


def test_too_few_examples_rejected(tmp_path):
    path = write_domain(tmp_path, "few", Path("m"))
    text = path.read_text(encoding="utf-8").replace("  - 蓝色正方形\n", "").replace("  - 左边有一个小的绿色三角形\n", "")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DomainSpecError, match="examples"):
        load_domain_file(path)


def test_broken_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("id: [unclosed\n", encoding="utf-8")
    with pytest.raises(DomainSpecError, match="broken.yaml"):
        load_domain_file(path)


def test_remote_sr_weights_need_sha256(tmp_path):
    path = write_domain(tmp_path, "sr", Path("m"))
    path.write_text(path.read_text(encoding="utf-8") + "sr_weights:\n  url: https://example.org/x.pth\n", encoding="utf-8")
    with pytest.raises(DomainSpecError, match="sr_weights.sha256"):
        load_domain_file(path)


def test_user_domain_folder_from_env_overrides(tmp_path, monkeypatch, tiny_model_dir):
    write_domain(tmp_path, "food", tiny_model_dir)
    monkeypatch.setenv("RAPID_DIFFUSION_DOMAINS", str(tmp_path))
    specs = load_domains()
    assert specs["food"].model.path == tiny_model_dir
    assert "guohua" in specs


def test_model_source_parse(tmp_path):
    assert ModelSource.parse(str(tmp_path)).path == tmp_path.resolve()
    hub = ModelSource.parse("alibaba-pai/pai-diffusion-food-large-zh@abc123")
    assert (hub.repo_id, hub.revision) == ("alibaba-pai/pai-diffusion-food-large-zh", "abc123")
    with pytest.raises(ValueError, match="neither a folder nor a hub id"):
        ModelSource.parse("no such thing")
