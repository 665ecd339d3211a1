import sys
import threading
import time

import pytest
import torch

from rapid_diffusion.domains import load_domains
from rapid_diffusion.models.registry import ModelRegistry, ModelUnavailableError, choose_weight_files, load_pipeline

from helpers import write_domain


def test_importing_the_package_loads_no_model_library():
    code = "import rapid_diffusion, rapid_diffusion.domains, rapid_diffusion.serving.cli, sys; print('diffusers' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class CountingLoader:
    """Wraps the real loader: counts loads and can slow them down to widen race windows."""

    def __init__(self, delay: float = 0.0):
        self.calls = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, folder, device, dtype):
        with self.lock:
            self.calls.append(folder)
        time.sleep(self.delay)
        return load_pipeline(folder, device, dtype)


def test_nothing_loads_until_first_use(registry):
    assert registry.loaded() == []
    spec = registry.spec("tiny")
    assert registry.state(spec) == "offline-ready"
    model = registry.get(spec)
    assert registry.state(spec) == "loaded"
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert model.pipe.tokenizer.__class__.__name__ == "BertTokenizer"
    assert model.pipe.text_encoder.__class__.__name__ == "CLIPTextModel"
    assert registry.get(spec) is model


def test_concurrent_first_requests_load_once(test_domains):
    loader = CountingLoader(delay=0.3)
    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32, loader=loader)
    spec = registry.spec("tiny")
    results = []
    threads = [threading.Thread(target=lambda: results.append(registry.get(spec))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loader.calls) == 1
    assert len({id(m) for m in results}) == 1


def test_lru_evicts_least_recently_used(test_domains, copy_model):
    for name in ("a", "b", "c"):
        write_domain(test_domains, name, copy_model(name))
    loader = CountingLoader()
    registry = ModelRegistry(max_models=2, device=torch.device("cpu"), dtype=torch.float32, loader=loader)
    a, b, c = (registry.spec(n) for n in "abc")
    registry.get(a)
    registry.get(b)
    registry.get(a)  # a is now the most recent
    registry.get(c)  # evicts b
    assert {m.key for m in registry.loaded()} == {a.model.key, c.model.key}
    registry.get(b)
    assert len(loader.calls) == 4


def test_memory_budget_bounds_the_cache(test_domains, copy_model):
    write_domain(test_domains, "other", copy_model("other"))
    registry = ModelRegistry(max_models=5, max_bytes=1, device=torch.device("cpu"), dtype=torch.float32)
    registry.get(registry.spec("tiny"))
    registry.get(registry.spec("other"))
    assert [m.key for m in registry.loaded()] == [registry.spec("other").model.key]


def test_unload(registry):
    spec = registry.spec("tiny")
    model = registry.get(spec)
    assert registry.unload(spec.model.key)
    assert model.pipe is None
    assert registry.state(spec) == "offline-ready"
    assert not registry.unload(spec.model.key)


def test_uncached_hub_model_offline_says_which_domain_and_what_works(registry, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    spec = registry.spec("food")
    assert registry.state(spec) == "needs-download"
    with pytest.raises(ModelUnavailableError) as info:
        registry.get(spec)
    message = str(info.value)
    assert "food" in message and "alibaba-pai/pai-diffusion-food-large-zh" in message
    assert "tiny" in message  # the domain that works offline


def test_broken_local_folder_is_a_clear_error(test_domains, tmp_path):
    write_domain(test_domains, "empty", tmp_path / "nothing-here")
    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ModelUnavailableError, match="empty"):
        registry.get(registry.spec("empty"))


def test_weight_file_choice_prefers_safetensors_and_skips_safety_checker():
    files = [
        "model_index.json",
        "README.md",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
        "tokenizer/vocab.txt",
        "safety_checker/pytorch_model.bin",
        "example1.png",
    ]
    chosen = choose_weight_files(files)
    assert "unet/diffusion_pytorch_model.safetensors" in chosen
    assert "unet/diffusion_pytorch_model.bin" not in chosen
    assert "vae/diffusion_pytorch_model.bin" in chosen
    assert "tokenizer/vocab.txt" in chosen
    assert not any(f.startswith("safety_checker") or f.endswith(".png") or f == "README.md" for f in chosen)


def test_bin_weights_load_without_executing_pickles(tmp_path, tiny_model_dir):
    """A .bin with a malicious pickle must be refused (weights_only loading), not executed."""
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Exploit()}, folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelUnavailableError):
        load_pipeline(folder, torch.device("cpu"), torch.float32)
    assert not marker.exists()


def test_shipped_domains_need_download_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    registry = ModelRegistry(domains=load_domains(), device=torch.device("cpu"))
    assert registry.state(registry.spec("guohua")) == "needs-download"


def test_download_progress_is_reported_in_steps():
    import io

    from rapid_diffusion.models.registry import _progress_tqdm

    messages = []
    bar = _progress_tqdm(messages.append)(total=1000, desc="unet/diffusion_pytorch_model.safetensors", file=io.StringIO())
    for _ in range(100):
        bar.update(10)
    bar.close()
    assert messages[-1].endswith("100%")
    assert 10 <= len(messages) <= 11
    assert all(m.startswith("unet/") for m in messages)


def test_domains_sharing_a_model_with_different_extras_get_their_own_entry(test_domains, tiny_model_dir):
    write_domain(test_domains, "tiny-kg", tiny_model_dir)
    path = test_domains / "tiny-kg.yaml"
    path.write_text(path.read_text(encoding="utf-8") + "knowledge_graph: ../no-graph\n", encoding="utf-8")
    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    plain, with_graph = registry.spec("tiny"), registry.spec("tiny-kg")
    assert registry.key_for(plain) == plain.model.key
    assert registry.key_for(with_graph) != registry.key_for(plain)
    registry.get(plain)
    assert registry.state(with_graph) == "offline-ready"


def test_eviction_releases_outside_the_registry_lock(test_domains, copy_model):
    """A running generation holds its model's lock; evicting that model must not hold the
    registry's lock meanwhile, or every other request (and /healthz) would wait for it."""
    folder = test_domains
    write_domain(folder, "other", copy_model("other-model"))
    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32, max_models=1)
    running = registry.get(registry.spec("tiny"))
    running.lock.acquire()  # a generation in progress on 'tiny'
    loader = threading.Thread(target=registry.get, args=(registry.spec("other"),))
    loader.start()
    deadline = time.monotonic() + 60
    while registry.state(registry.spec("other")) != "loaded" and time.monotonic() < deadline:
        time.sleep(0.05)
    answered = []
    probe = threading.Thread(target=lambda: answered.append(registry.loaded()))
    probe.start()
    probe.join(timeout=5)
    try:
        assert answered and [m.key for m in answered[0]] == [registry.key_for(registry.spec("other"))]
        assert running.pipe is not None  # not released while its generation runs
    finally:
        running.lock.release()
    loader.join(timeout=30)
    assert running.pipe is None


def test_a_model_unloaded_before_its_lock_is_unavailable_and_says_try_again(registry):
    from rapid_diffusion import errors
    from helpers import generate_one
    from rapid_diffusion.generation.request import GenerationRequest

    spec = registry.spec("tiny")
    model = registry.get(spec)

    class StaleRegistry:
        def get(self, spec):
            return model

    registry.unload(model.key)
    with pytest.raises(ModelUnavailableError, match="请重试.*try again"):
        generate_one(GenerationRequest(prompt="红色圆形", seed=0, num_inference_steps=1), spec, registry=StaleRegistry())
    assert ModelUnavailableError is errors.ModelUnavailableError


def test_a_domain_file_written_after_start_is_served_at_once_and_a_removed_one_is_gone(test_domains, tiny_model_dir, tmp_path):
    """A finished fine-tune registers itself by writing a YAML file; every face sees it without a poll or a reload."""
    from rapid_diffusion.domains import user_domains_dir

    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    assert "new-model" not in registry.domains
    user_domains_dir().mkdir(parents=True, exist_ok=True)
    written = write_domain(user_domains_dir(), "new-model", tiny_model_dir)
    assert registry.spec("new-model").id == "new-model"
    written.unlink()
    with pytest.raises(KeyError):
        registry.spec("new-model")
    fixed = ModelRegistry(domains=load_domains([test_domains]), device=torch.device("cpu"))
    write_domain(user_domains_dir(), "other", tiny_model_dir)
    assert "other" not in fixed.domains, "a registry given its domains keeps them"
