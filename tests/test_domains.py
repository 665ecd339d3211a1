import os
import subprocess
import sys
from pathlib import Path

import pytest

from rapid_diffusion.domains import DomainSpecError, ModelSource, load_domain_file, load_domains
from rapid_diffusion.paths import SHIPPED_DOMAINS_DIR

from helpers import REPO_ROOT, write_domain


def test_shipped_domains_are_valid_and_listed():
    specs = load_domains([SHIPPED_DOMAINS_DIR])
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


def test_one_bad_file_is_skipped_with_its_error_and_the_others_load(tmp_path, caplog):
    write_domain(tmp_path, "good", Path("m"))
    bad = write_domain(tmp_path, "bad", Path("m"), sampler="magic")
    with caplog.at_level("ERROR", logger="rapid_diffusion.domains"):
        specs = load_domains([tmp_path])
    assert list(specs) == ["good"]
    assert [(e.source, e.field_name) for e in specs.errors] == [(str(bad), "sampler")]
    assert str(bad) in caplog.text and "sampler" in caplog.text


@pytest.mark.parametrize(
    "content",
    ["id: 美食\ntitle: {zh: 美食, en: Food}\n".encode("gbk"), b"\x00\x01\xff\xfe\x80binary", b"\xef\xbb\xbfid: [unclosed\n"],
    ids=["gbk", "binary", "bom-broken-yaml"],
)
def test_non_utf8_or_binary_yaml_names_the_file(tmp_path, content):
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    with pytest.raises(DomainSpecError) as info:
        load_domain_file(path)
    assert str(path) in str(info.value) and info.value.field_name == "<file>"
    if content.startswith(b"\xef"):
        assert "not valid YAML" in str(info.value)
    else:
        assert "不是 UTF-8 编码 / not UTF-8" in str(info.value)


def test_utf8_bom_yaml_loads(tmp_path):
    path = write_domain(tmp_path, "bom", Path("m"))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_domain_file(path).id == "bom"


def test_bad_user_file_is_skipped_and_cannot_replace_an_owner_domain(tmp_path, monkeypatch):
    owner, user = tmp_path / "owner", tmp_path / "home" / "domains"
    owner.mkdir()
    user.mkdir(parents=True)
    write_domain(owner, "shared", Path("owner-model"))
    write_domain(user, "shared", Path("user-model"))
    write_domain(user, "mine", Path("m"))
    (user / "broken.yaml").write_bytes(b"\xff\xfe garbage")
    monkeypatch.setenv("RAPID_DIFFUSION_DOMAINS", str(owner))
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    specs = load_domains()
    assert specs["shared"].model.path == (owner / "owner-model").resolve()
    assert "mine" in specs and "food" in specs
    assert [e.source for e in specs.errors] == [str(user / "broken.yaml")]


def test_registry_exposes_domain_errors(tmp_path, monkeypatch):
    from rapid_diffusion.models.registry import ModelRegistry

    write_domain(tmp_path, "fine", Path("m"))
    (tmp_path / "bad.yaml").write_text("id: bad\n", encoding="utf-8")
    monkeypatch.setenv("RAPID_DIFFUSION_DOMAINS", str(tmp_path))
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    registry = ModelRegistry()
    assert "fine" in registry.domains
    assert [(e.source, e.field_name) for e in registry.domain_errors] == [(str(tmp_path / "bad.yaml"), "title")]
    assert ModelRegistry(domains={}).domain_errors == []


def test_blank_example_is_refused_by_name(tmp_path):
    """What `train --validation-prompt " "` used to write: the trainer must drop blank prompts."""
    path = write_domain(tmp_path, "blank", Path("m"))
    path.write_text(path.read_text(encoding="utf-8").replace("  - 蓝色正方形\n", "  - ' '\n"), encoding="utf-8")
    with pytest.raises(DomainSpecError) as info:
        load_domain_file(path)
    assert info.value.field_name == "examples"


def run_domains_cli(env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env_extra}
    return subprocess.run([sys.executable, "-m", "rapid_diffusion", "domains"], capture_output=True, text=True, env=env, timeout=120)


def test_cli_domains_lists_the_good_and_reports_the_bad_on_stderr(tmp_path):
    (tmp_path / "gbk.yaml").write_bytes("id: 美食\n".encode("gbk"))
    write_domain(tmp_path, "bad", Path("m"), height=100)
    result = run_domains_cli({"RAPID_DIFFUSION_DOMAINS": str(tmp_path), "RAPID_DIFFUSION_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == ["demo", "ecommerce", "food", "guohua"]
    assert f"{tmp_path / 'gbk.yaml'}: field '<file>': 不是 UTF-8 编码 / not UTF-8" in result.stderr
    assert f"{tmp_path / 'bad.yaml'}: field 'height'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_domains_fails_only_when_no_domain_is_valid(tmp_path, monkeypatch):
    import rapid_diffusion.domains as domains

    monkeypatch.setattr(domains, "SHIPPED_DOMAINS_DIR", tmp_path / "domains")  # in-process: only the bad file
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "bad.yaml").write_text("id: x\n", encoding="utf-8")
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    from rapid_diffusion.serving.cli import main

    assert main(["domains"]) == 2
