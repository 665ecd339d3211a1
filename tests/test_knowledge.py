"""Knowledge-enhanced text encoder: linking, TransE, injection, save/load, registry and CLI."""

import pytest
import torch

from rapid_diffusion.knowledge import (
    KNOWLEDGE_DIR,
    NO_ENTITY,
    EntityEmbeddings,
    EntityLinker,
    EntitySpan,
    GraphError,
    Knowledge,
    KnowledgeGraph,
    KnowledgePromptEncoder,
    KnowledgeTextEncoder,
    TransEConfig,
    Triple,
    describe_entities,
    evaluate_link_prediction,
    span_token_positions,
    train_transe,
)
from rapid_diffusion.knowledge.transe import corrupt

from helpers import write_domain

FOOD_TRIPLES = "番茄\t颜色\t红色\n番茄\t形状\t圆形\n香蕉\t颜色\t黄色\n番茄酱\t颜色\t红色\n"


def spans(linker, text):
    return [(s.start, s.end, s.text, s.entity) for s in linker.link(text)]


@pytest.fixture()
def graph_dir(tmp_path):
    folder = tmp_path / "graph"
    folder.mkdir()
    (folder / "triples.tsv").write_text("# head relation tail\n" + FOOD_TRIPLES, encoding="utf-8")
    (folder / "entities.tsv").write_text("番茄\t西红柿，蕃茄\n香蕉\tbanana\n", encoding="utf-8")
    return folder


@pytest.fixture()
def graph(graph_dir):
    return KnowledgeGraph.load(graph_dir)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from rapid_diffusion.models.registry import load_pipeline

    return load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)


def random_embeddings(graph, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return EntityEmbeddings(
        graph.entities, graph.relations, torch.randn(len(graph.entities), dim, generator=generator), torch.zeros(len(graph.relations), dim)
    )


def knowledge_for(graph, pipe, projection_seed=None):
    knowledge = Knowledge.create(graph, random_embeddings(graph), pipe.text_encoder.config.hidden_size)
    if projection_seed is not None:
        torch.manual_seed(projection_seed)
        torch.nn.init.normal_(knowledge.injector.projection.weight)
        torch.nn.init.normal_(knowledge.injector.projection.bias)
    return knowledge


# --- graph files and linking ---------------------------------------------------------------


def test_graph_loads_entities_relations_aliases_and_facts(graph):
    assert graph.entities == ["番茄", "香蕉", "红色", "圆形", "黄色", "番茄酱"]
    assert graph.relations == ["颜色", "形状"]
    assert graph.aliases["番茄"] == ("西红柿", "蕃茄")
    assert graph.facts("番茄") == [("颜色", "红色"), ("形状", "圆形")]
    assert graph.surface_forms()["banana"] == "香蕉"


def test_malformed_triple_names_file_and_line(tmp_path):
    bad = tmp_path / "triples.tsv"
    bad.write_text("番茄\t颜色\t红色\n番茄 颜色 红色\n", encoding="utf-8")
    with pytest.raises(GraphError, match=r"triples.tsv:2"):
        KnowledgeGraph.load(bad)


def test_graph_save_load_round_trip(graph, tmp_path):
    again = KnowledgeGraph.load(graph.save(tmp_path / "copy"))
    assert again.triples == graph.triples and again.aliases == graph.aliases


def test_linking_takes_the_longest_match_and_aliases(graph):
    linker = EntityLinker(graph.surface_forms())
    assert spans(linker, "西红柿配番茄酱，红色的") == [
        (0, 3, "西红柿", "番茄"),
        (4, 7, "番茄酱", "番茄酱"),
        (8, 10, "红色", "红色"),
    ]
    assert spans(linker, "一根BANANA") == [(2, 8, "BANANA", "香蕉")]


def test_linking_is_leftmost_then_longest_without_overlaps():
    linker = EntityLinker({"北京": "北京", "京剧": "京剧", "苹果": "苹果", "果汁": "果汁", "苹果汁": "苹果汁"})
    assert spans(linker, "北京剧院") == [(0, 2, "北京", "北京")]
    assert spans(linker, "苹果汁") == [(0, 3, "苹果汁", "苹果汁")]
    assert spans(linker, "苹果果汁") == [(0, 2, "苹果", "苹果"), (2, 4, "果汁", "果汁")]
    assert spans(linker, "看京剧") == [(1, 3, "京剧", "京剧")]


def test_linking_without_match_is_empty(graph):
    linker = EntityLinker(graph.surface_forms())
    assert linker.link("一只蓝色的猫") == []
    assert linker.link("") == []
    assert spans(linker, "番") == []


def test_offsets_map_spans_to_token_positions(pipe):
    text = "两个西红柿 and 番茄"
    encoded = pipe.tokenizer(text, return_offsets_mapping=True)
    found = [EntitySpan(2, 5, "西红柿", "番茄"), EntitySpan(10, 12, "番茄", "番茄"), EntitySpan(20, 22, "无", "无")]
    positions = span_token_positions(encoded["offset_mapping"], found)
    tokens = pipe.tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert [[tokens[i] for i in p] for p in positions] == [["西", "红", "柿"], ["番", "茄"], []]
    assert positions[0] == [3, 4, 5]  # [CLS] 两 个 西 红 柿


# --- TransE -------------------------------------------------------------------------------


def toy_graph():
    colours, shapes = ["红色", "绿色", "蓝色", "黄色"], ["圆形", "方形", "星形"]
    triples = []
    for i in range(20):
        triples += [Triple(f"物{i}", "颜色", colours[i % 4]), Triple(f"物{i}", "形状", shapes[i % 3])]
    return KnowledgeGraph(triples)


def test_corruption_replaces_exactly_one_of_head_or_tail():
    triples = torch.tensor([[0, 0, 1]] * 200)
    corrupted = corrupt(triples, 1000, torch.Generator().manual_seed(0))
    changed_head = corrupted[:, 0] != 0
    changed_tail = corrupted[:, 2] != 1
    assert not (changed_head & changed_tail).any()
    assert (corrupted[:, 1] == 0).all()
    assert 60 < changed_head.sum() < 140 and 60 < changed_tail.sum() < 140


def test_transe_learns_a_toy_graph():
    graph = toy_graph()
    model, loss = train_transe(graph, TransEConfig(dim=32, epochs=100, seed=0))
    triples = graph.index_triples()
    result = evaluate_link_prediction(model, triples, set(triples))
    norms = model.entity.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert result.chance_mean_rank == 14.0
    assert result.mean_rank < 1.5 and result.hits_at_1 > 0.9
    untrained = train_transe(graph, TransEConfig(dim=32, epochs=0, seed=0))[0]
    assert evaluate_link_prediction(untrained, triples, set(triples)).mean_rank > 4


def test_embeddings_save_load_round_trip(tmp_path):
    graph = toy_graph()
    model, _ = train_transe(graph, TransEConfig(dim=8, epochs=2))
    path = EntityEmbeddings.from_model(model, graph).save(tmp_path / "kg.safetensors")
    loaded = EntityEmbeddings.load(path)
    assert loaded.entities == graph.entities and loaded.relations == graph.relations and loaded.dim == 8
    assert torch.equal(loaded.entity_vectors, model.entity.weight.detach())


# --- injection ----------------------------------------------------------------------------


def test_zero_projection_encodes_exactly_like_the_plain_pipeline(graph, pipe):
    encoder = KnowledgePromptEncoder(pipe, knowledge_for(graph, pipe))
    prompt, negative = "一个西红柿和香蕉", "模糊的番茄"
    assert encoder.knowledge.tokenize(pipe.tokenizer, [prompt]).entity_ids.ne(NO_ENTITY).sum() == 5
    with torch.inference_mode():
        ours = encoder(prompt, torch.device("cpu"), 2, True, negative_prompt=negative)
        plain = pipe.encode_prompt(prompt, torch.device("cpu"), 2, True, negative_prompt=negative)
        ours_no_cfg = encoder([prompt], torch.device("cpu"), 1, False)
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])
    assert ours[0].shape == (2, 32, 32) and ours_no_cfg[1] is None
    assert torch.equal(ours_no_cfg[0], plain[0][:1])


def capture_embedding_outputs(pipe, run):
    captured = []
    handle = pipe.text_encoder.embeddings.register_forward_hook(lambda m, i, out: captured.append(out.detach().clone()))
    try:
        hidden = run()
    finally:
        handle.remove()
    return captured[0], hidden


def test_nonzero_projection_changes_only_the_entity_tokens_inputs(graph, pipe):
    knowledge = knowledge_for(graph, pipe, projection_seed=1)
    batch = knowledge.tokenize(pipe.tokenizer, ["我爱吃西红柿"])
    entity_tokens = batch.entity_ids[0].ne(NO_ENTITY)
    assert entity_tokens.nonzero().flatten().tolist() == [4, 5, 6]
    encoder = KnowledgeTextEncoder(pipe.text_encoder, knowledge.injector)
    with torch.no_grad():
        injected_in, injected = capture_embedding_outputs(pipe, lambda: encoder(batch.input_ids, batch.entity_ids))
        plain_in, plain = capture_embedding_outputs(pipe, lambda: encoder(batch.input_ids))
    changed = (injected_in != plain_in).any(dim=-1)[0]
    assert torch.equal(changed, entity_tokens)
    row = knowledge.entity_rows["番茄"]
    expected = knowledge.injector.projection(knowledge.embeddings.entity_vectors[row])
    assert torch.allclose(injected_in[0, 5] - plain_in[0, 5], expected, atol=1e-5)
    # The encoder is causal: outputs before the first entity token are untouched, later ones change.
    assert torch.equal(injected[0, :4], plain[0, :4]) and not torch.allclose(injected[0, 4:], plain[0, 4:])
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks
    assert pipe.text_encoder.needs_torch_forward is False  # set only while the hook is held


def test_projection_is_the_only_trainable_knowledge_parameter(graph, pipe):
    knowledge = knowledge_for(graph, pipe)
    encoder = KnowledgeTextEncoder(pipe.text_encoder, knowledge.injector)
    batch = knowledge.tokenize(pipe.tokenizer, ["番茄"])
    encoder(batch.input_ids, batch.entity_ids).sum().backward()
    assert [name for name, _ in knowledge.injector.named_parameters()] == ["projection.weight", "projection.bias"]
    assert knowledge.injector.projection.weight.grad.abs().sum() > 0
    pipe.text_encoder.zero_grad(set_to_none=True)


def test_knowledge_save_load_round_trip(graph, pipe, tmp_path):
    knowledge = knowledge_for(graph, pipe, projection_seed=2)
    folder = knowledge.save(tmp_path / "model" / KNOWLEDGE_DIR)
    loaded = Knowledge.load(folder)
    assert loaded.graph.triples == graph.triples and loaded.graph.aliases == graph.aliases
    assert torch.equal(loaded.injector.projection.weight, knowledge.injector.projection.weight)
    assert torch.equal(loaded.injector.entity_vectors, knowledge.injector.entity_vectors)
    with torch.inference_mode():
        before = KnowledgePromptEncoder(pipe, knowledge)("香蕉和番茄", torch.device("cpu"), 1, True)
        after = KnowledgePromptEncoder(pipe, loaded)("香蕉和番茄", torch.device("cpu"), 1, True)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_describe_entities_says_what_the_graph_knows(graph, pipe):
    knowledge = knowledge_for(graph, pipe)
    assert describe_entities(knowledge, "红色的西红柿，番茄和香蕉") == [
        "西红柿（番茄） → 颜色: 红色；形状: 圆形",
        "香蕉 → 颜色: 黄色",
    ]
    assert describe_entities(knowledge, "一只猫") == []


# --- registry wiring and CLI ----------------------------------------------------------------


def test_registry_uses_the_knowledge_encoder_only_when_the_model_has_it(
    graph, graph_dir, pipe, copy_model, test_domains, tiny_model_dir
):
    from helpers import generate_one
    from rapid_diffusion.generation.request import GenerationRequest
    from rapid_diffusion.models.registry import ModelRegistry

    with_knowledge = copy_model("with-knowledge")
    knowledge_for(graph, pipe, projection_seed=3).save(with_knowledge / KNOWLEDGE_DIR)
    write_domain(test_domains, "kg", with_knowledge, knowledge_graph=str(graph_dir))
    without_knowledge = copy_model("without-knowledge")
    write_domain(test_domains, "kg-no-weights", without_knowledge, knowledge_graph=str(graph_dir))
    loads = []
    registry = ModelRegistry(
        device=torch.device("cpu"), dtype=torch.float32, max_models=3, loader=lambda *args: loads.append(args) or pipe
    )
    assert registry.get(registry.spec("tiny")).encode_prompt is None
    assert registry.get(registry.spec("kg-no-weights")).encode_prompt is None
    model = registry.get(registry.spec("kg"))
    assert isinstance(model.encode_prompt, KnowledgePromptEncoder)
    assert model.encode_prompt.describe("番茄") == ["番茄 → 颜色: 红色；形状: 圆形"]

    with torch.inference_mode():
        cat = model.encode_prompt("一只猫", torch.device("cpu"), 1, True)
        plain_cat = pipe.encode_prompt("一只猫", torch.device("cpu"), 1, True)
    assert torch.equal(cat[0], plain_cat[0]) and torch.equal(cat[1], plain_cat[1])

    def image(domain, prompt):
        request = GenerationRequest(prompt=prompt, seed=0, num_inference_steps=1)
        return torch.tensor(list(generate_one(request, registry.spec(domain), registry=registry).images[0].getdata()))

    assert not torch.equal(image("kg", "番茄"), image("tiny", "番茄"))
    assert [folder for folder, *_ in loads] == [tiny_model_dir, without_knowledge, with_knowledge]


def test_cli_kg_train_and_attach(graph_dir, copy_model, tmp_path, capsys):
    from rapid_diffusion.knowledge import has_knowledge
    from rapid_diffusion.serving.cli import main

    out = tmp_path / "emb" / "kg.safetensors"
    assert main(["kg", "train", "--graph", str(graph_dir), "--out", str(out), "--dim", "16", "--epochs", "20"]) == 0
    embeddings = EntityEmbeddings.load(out)
    assert embeddings.entities == KnowledgeGraph.load(graph_dir).entities and embeddings.dim == 16
    assert "mean rank" in capsys.readouterr().err
    model = copy_model("attached")
    assert main(["kg", "attach", "--model", str(model), "--graph", str(graph_dir), "--embeddings", str(out)]) == 0
    assert has_knowledge(model)
    assert torch.count_nonzero(Knowledge.load(model / KNOWLEDGE_DIR).injector.projection.weight) == 0
    assert main(["kg", "train", "--graph", str(tmp_path / "missing"), "--out", str(out)]) == 2


# --- demo graph -----------------------------------------------------------------------------


def test_demo_graph_uses_world_attributes_and_leaks_no_attribute_characters():
    from rapid_diffusion.demo import world
    from rapid_diffusion_dev.knowledge_demo.demo import DEMO_GRAPH, attributes, load_split

    graph, split = KnowledgeGraph.load(DEMO_GRAPH), load_split()
    assert len(split["train"]) == 16 and len(split["graph_only"]) == 10
    assert not set(split["train"]) & set(split["graph_only"])
    attribute_chars = set("".join(world.COLOUR_NAMES) + "".join(w for ws in world.SHAPE_WORDS.values() for w in ws))
    for entity in split["train"] + split["graph_only"]:
        colour, shape = attributes(graph, entity)
        assert colour in world.COLOURS and shape in world.SHAPES
        names = (entity, *graph.aliases.get(entity, ()))
        assert not any(set(name) & attribute_chars for name in names), entity


def test_entity_captions_name_training_entities_in_place_of_attributes():
    import numpy as np

    from rapid_diffusion.demo import world
    from rapid_diffusion_dev.knowledge_demo.demo import DEMO_GRAPH, EntityCaptioner, load_split

    graph = KnowledgeGraph.load(DEMO_GRAPH)
    captioner = EntityCaptioner(graph, load_split()["train"], probability=1.0)
    tomato = world.Scene((world.SceneObject("红色", "圆形", "大", "左"),))
    rng = np.random.default_rng(0)
    captions = [captioner(tomato, rng) for _ in range(10)]
    assert all("番茄" in c and "红" not in c and "圆" not in c for c in captions)
    cherry_only = world.Scene((world.SceneObject("黑色", "圆形", "大", "左"),))
    assert "番茄" not in captioner(cherry_only, rng) and "黑" in captioner(cherry_only, rng)


def test_entity_attribute_measurement_against_the_judge():
    from rapid_diffusion.demo import world
    from rapid_diffusion_dev.knowledge_demo.demo import DEMO_GRAPH, attributes, measure_entity_attributes

    graph = KnowledgeGraph.load(DEMO_GRAPH)
    entities = ["樱桃", "骰子", "钻石"]

    def perfect(prompt, seed):
        colour, shape = attributes(graph, next(e for e in entities if e in prompt))
        return world.render(world.Scene((world.SceneObject(colour, shape, "大", "中"),)))

    def always_red_circle(prompt, seed):
        return world.render(world.Scene((world.SceneObject("红色", "圆形", "大", "中"),)))

    assert measure_entity_attributes(perfect, graph, entities, [0, 1]).both == 1.0
    wrong = measure_entity_attributes(always_red_circle, graph, entities, [0])
    assert wrong.per_entity["樱桃"]["both"] == 1.0 and wrong.per_entity["骰子"]["both"] == 0.0
    assert abs(wrong.both - 1 / 3) < 1e-6


def test_demo_finetune_trains_the_projection_and_registers_a_knowledge_domain(copy_model, tmp_path, monkeypatch):
    from rapid_diffusion.domains import load_domains
    from rapid_diffusion.models.registry import ModelRegistry
    from rapid_diffusion_dev.knowledge_demo.finetune_demo import DemoFinetuneConfig, finetune_demo

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    config = DemoFinetuneConfig(
        out=tmp_path / "demo-kg", base=copy_model("base"), steps=2, batch_size=4, num_scenes=8
    )
    out = finetune_demo(config, log=lambda message: None)
    from rapid_diffusion.training.run_files import read_losses, read_status

    assert [row["step"] for row in read_losses(out)] == [1, 2] and read_status(out)["state"] == "done", "the product's trainer ran it"
    captions = (tmp_path / "demo-kg-pairs" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(captions) == 8, "the generated pairs it trained on"
    projection = Knowledge.load(out / KNOWLEDGE_DIR).injector.projection.weight
    assert torch.count_nonzero(projection) > 0
    spec = load_domains([tmp_path / "home" / "domains"])["demo-kg"]
    assert spec.knowledge_graph == (out / KNOWLEDGE_DIR).resolve()
    model = ModelRegistry(domains={"demo-kg": spec}, device=torch.device("cpu"), dtype=torch.float32).get(spec)
    assert model.encode_prompt.describe("一个樱桃") == ["樱桃 → 颜色: 红色；形状: 圆形"]


def test_demo_transe_vectors_carry_graph_only_attributes_linearly():
    from rapid_diffusion_dev.knowledge_demo.demo import DEMO_GRAPH, linear_probe_accuracy, load_split

    graph, split = KnowledgeGraph.load(DEMO_GRAPH), load_split()
    trained = EntityEmbeddings.from_model(train_transe(graph, TransEConfig(dim=64, epochs=1000, seed=0))[0], graph)
    untrained = EntityEmbeddings.from_model(train_transe(graph, TransEConfig(dim=64, epochs=0, seed=0))[0], graph)
    accuracy, baseline = linear_probe_accuracy(trained, graph, split), linear_probe_accuracy(untrained, graph, split)
    assert accuracy["colour"] >= 0.8 and accuracy["shape"] >= 0.8
    assert baseline["colour"] < 0.5 and baseline["shape"] < 0.5
