"""Encoder families beyond BERT: each runs the whole compression chain with every parity gate passing, and a
family the pruning module cannot cut fails at validation, naming its model_type."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.recipe import RecipeError, load_recipe
from toolkit.runtime import load_model, onnx_file
from toolkit.stages.pooled import pooled_tail

CHAIN = [
    {"type": "train", "epochs": 8, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0},
    {"type": "prune", "heads_per_layer": 2, "ffn_size": 32, "importance_batches": 4},
    {"type": "distill", "student": {"num_layers": 1}, "epochs": 4, "batch_size": 16, "learning_rate": 2e-3},
    {"type": "export"},
    # A one-layer student's layer after its attention is all tail: left whole here so that packing has work on
    # every family; the tail is cut on a copy in the test.
    {"type": "optimize", "pooled_tail": False},
    {"type": "quantize", "instruction_set": "avx2"},
]


# ONNX Runtime's transformer optimizer fuses these families' attention into one Attention op; DeBERTa's
# disentangled attention and MPNet's relative-position bias stay unfused (see docs/stages.md).
FUSED_ATTENTION = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")


def tiny_family_model(family: str, folder: Path, bert_folder: Path) -> Path:
    """A tiny random encoder of `family` that reads the tiny BERT's WordPiece tokenizer (the tokenizer's kind does
    not matter to the architecture; its pad id does)."""
    from transformers import (
        AutoTokenizer,
        DebertaV2Config,
        DebertaV2Model,
        DistilBertConfig,
        DistilBertModel,
        ElectraConfig,
        ElectraModel,
        ModernBertConfig,
        ModernBertModel,
        MPNetConfig,
        MPNetModel,
        RobertaConfig,
        RobertaModel,
        XLMRobertaConfig,
        XLMRobertaModel,
    )

    # DistilBERT, MPNet and ModernBERT take no token_type_ids: their tokenizers return none.
    no_types = family in ("distilbert", "mpnet", "modernbert")
    extra = {"model_input_names": ["input_ids", "attention_mask"]} if no_types else {}
    tokenizer = AutoTokenizer.from_pretrained(bert_folder, **extra)
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    if family == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4,
                                                 hidden_dim=64, dropout=0.0, attention_dropout=0.0,
                                                 max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    elif family == "electra":
        model = ElectraModel(ElectraConfig(embedding_size=32, max_position_embeddings=64, **common))
    elif family == "deberta-v2":  # DeBERTa-v3's shape: relative positions, separate position projections
        model = DebertaV2Model(DebertaV2Config(max_position_embeddings=64, relative_attention=True,
                                               pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=32,
                                               share_att_key=False, norm_rel_ebd="layer_norm", **common))  # fmt: skip
    elif family == "modernbert":  # global attention every 2nd layer, local (window 8 < max_length 16) between
        model = ModernBertModel(ModernBertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3,
                                                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                                 global_attn_every_n_layers=2, local_attention=8, reference_compile=False,
                                                 pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                                                 sep_token_id=tokenizer.sep_token_id))  # fmt: skip
    elif family == "mpnet":
        model = MPNetModel(MPNetConfig(max_position_embeddings=64 + tokenizer.pad_token_id + 1, **common))
    else:  # RoBERTa-style positions start after the pad id
        config_cls, model_cls = {
            "roberta": (RobertaConfig, RobertaModel),
            "xlm-roberta": (XLMRobertaConfig, XLMRobertaModel),
        }[family]
        model = model_cls(
            config_cls(max_position_embeddings=64 + tokenizer.pad_token_id + 1, type_vocab_size=1, **common)
        )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    return folder


@pytest.fixture
def family_recipe(tiny_model, toy_recipe, tmp_path):
    def make(family: str, stages=CHAIN) -> Path:
        model = tiny_model if family == "bert" else tiny_family_model(family, tmp_path / family, tiny_model)
        recipe = {**toy_recipe, "model": {"name": str(model), "max_length": 16}, "stages": stages}
        path = tmp_path / f"{family}.yaml"
        path.write_text(json.dumps(recipe))  # JSON is YAML
        return path

    return make


@pytest.mark.slow
@pytest.mark.parametrize(
    "family", ["roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "mpnet", "modernbert"]
)
def test_family_runs_prune_distill_and_the_onnx_stages_with_every_gate_passing(family, family_recipe):
    ffn_only = family in ("mpnet", "deberta-v2", "modernbert")  # their stock configs cannot record fewer heads
    chain = [CHAIN[0], {**CHAIN[1], "heads_per_layer": None}, *CHAIN[2:]] if ffn_only else CHAIN
    path = family_recipe(family, chain)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    stages = json.loads((path.parent / "run" / "manifest.json").read_text())["stages"]
    assert [stages[s["type"]]["status"] for s in CHAIN] == ["done"] * len(CHAIN), {
        k: v.get("status") for k, v in stages.items()
    }
    for name in ("export", "optimize", "quantize"):
        assert stages[name]["gate"]["passed"], (name, stages[name]["gate"])
    heads = [4] * (3 if family == "modernbert" else 2) if ffn_only else [2, 2]
    assert stages["prune"]["info"]["heads_per_layer"] == heads and stages["distill"]["info"]["student_layers"] == 1
    assert stages["prune"]["info"]["ffn_size"] == 32
    fused = stages["optimize"]["info"]["fused_ops"]
    packing = stages["quantize"]["info"]["pack_tokens"]
    print(family, "fusions:", fused, "quantized:", stages["quantize"]["info"]["fused_ops"], "packing:", packing)
    if family in FUSED_ATTENTION:
        assert fused.get("Attention") == 1, fused  # the one student layer's attention is fused
    # Token packing goes where attention is fused (and the INT8 gate still passed), and says why not elsewhere.
    assert packing["applied"] is (family in FUSED_ATTENTION), packing
    if not packing["applied"]:
        assert packing["reason"] == "no fused attention (Attention or QAttention) to pack around", packing
    # Per-token INT8 scales: a text's INT8 answer is the same in a padded call of several texts (the packed branch
    # where packing applied) as alone (no padding: the unpacked graph), to float rounding.
    quantize = stages["quantize"]["info"]
    assert quantize["batch_invariant"] is True and quantize["token_scales"]["applied"], quantize["token_scales"]
    int8 = load_model(Path(stages["quantize"]["output"]["path"]), "onnx", 16, 1, "cpu")
    mixed = ["a good film", "the plot was dull and slow, and far too long to sit through", "fine", "superb"]
    alone = np.concatenate([int8.run(int8.tokenizer([t])) for t in mixed])
    np.testing.assert_allclose(int8.run(int8.tokenizer(mixed)), alone, atol=1e-5)
    # Every family here classifies from its first token: the tail cut answers as the whole graph.
    whole = Path(stages["optimize"]["output"]["path"])
    cut = shutil.copytree(whole, path.parent / "cut")
    tail = pooled_tail(onnx_file(cut))
    print(family, "pooled tail:", tail)
    # Projection, residual, LayerNorms and FFN; ModernBERT's gated FFN splits its input with Slice (not taken as
    # per-token): its tail starts at the gate's product.
    assert tail["applied"] and tail["tail_ops"] >= (5 if family == "modernbert" else 8), tail
    texts = ["a good film", "the plot was dull and slow, and far too long", "fine"]
    before, after = (load_model(p, "onnx", 16, 1, "cpu") for p in (whole, cut))
    np.testing.assert_allclose(after.logits(texts), before.logits(texts), atol=1e-5)


def test_family_the_pruner_cannot_cut_fails_at_validation(family_recipe, tmp_path, tiny_model):
    from transformers import AlbertConfig, AlbertModel, AutoTokenizer

    folder = tmp_path / "albert"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    AlbertModel(AlbertConfig(vocab_size=tokenizer.vocab_size, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64)).save_pretrained(folder)  # fmt: skip
    tokenizer.save_pretrained(folder)
    path = family_recipe("bert")
    recipe = json.loads(path.read_text())
    recipe["model"]["name"] = str(folder)
    for stages, message in (
        (CHAIN[:2], r"stages\[1\] \(prune\): prune cannot cut a model_type 'albert' model; supported families: bert"),
        ([CHAIN[0], CHAIN[2]], r"distill with a layer subset of the teacher cannot cut a model_type 'albert' model"),
    ):
        path.write_text(json.dumps({**recipe, "stages": stages}))
        with pytest.raises(RecipeError, match=message):
            load_recipe(path)
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 1 and "model_type 'albert'" in result.output and "Traceback" not in result.output
    # Distilling into another pretrained model does not cut the teacher: any family may teach.
    student = {**CHAIN[2], "student": {"model": str(tiny_model)}}
    path.write_text(json.dumps({**recipe, "stages": [CHAIN[0], student]}))
    assert load_recipe(path).stages[1].student.model == str(tiny_model)


@pytest.mark.parametrize("family", ["mpnet", "deberta-v2", "modernbert"])
def test_head_pruning_a_config_cannot_record_is_refused_at_validation(family, family_recipe):
    path = family_recipe(family, CHAIN[:2])
    message = rf"prune cannot prune the heads of a model_type '{family}' model: .*set only ffn_size"
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)
    path = family_recipe(family, [CHAIN[0], {**CHAIN[1], "heads_per_layer": None}])
    assert load_recipe(path).stages[1].ffn_size == 32


def test_deberta_ffn_pruning_and_layer_subset_reload_with_the_same_logits(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForSequenceClassification

    from toolkit import pruning

    folder = tiny_family_model("deberta-v2", tmp_path / "deberta", tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    with pytest.raises(pruning.PruningError, match="DeBERTa-v2/v3 heads cannot be pruned"):
        pruning.keep_heads(model, [[0, 1], [0, 1]])
    pruning.keep_neurons(model, [list(range(0, 64, 2))] * 2)
    pruning.keep_layers(model, [1])
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    assert pruning.ffn_sizes(reloaded) == [32] and reloaded.config.num_hidden_layers == 1
    ids = torch.randint(5, 100, (3, 12))
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_modernbert_gated_ffn_and_kind_keeping_layer_subset_reload_with_the_same_logits(tmp_path, tiny_model):
    """ModernBERT: the gated FFN is cut in its value and gate halves alike; a layer subset must start at layer 0
    and keep every layer global or local at its new index (the reloaded model decides both by index)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from toolkit import pruning

    folder = tiny_family_model("modernbert", tmp_path / "modernbert", tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    assert pruning.ffn_sizes(model) == [64] * 3
    for layers, message in (([1, 2], "first layer kept must be layer 0"), ([0, 2], r"layers \[2\] would change kind")):
        with pytest.raises(pruning.PruningError, match=message):
            pruning.keep_layers(model, layers)
    ids = torch.randint(5, 100, (3, 14))  # longer than the local window (8): local and global layers differ
    pruning.keep_neurons(model, [list(range(0, 64, 2))] * 3)
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    pruning.keep_layers(model, [0, 1])
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    assert pruning.ffn_sizes(reloaded) == [32, 32] and reloaded.config.num_hidden_layers == 2
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        assert not torch.allclose(before, reloaded(input_ids=ids).logits)  # a layer was really removed


def test_modernbert_student_layers_keep_their_kind_at_validation(family_recipe):
    from toolkit.config import student_layers

    assert student_layers(22, 3, 3) == [0, 14, 20]  # ModernBERT-base's 22 layers, global every 3rd
    assert student_layers(6, 3) == [1, 3, 5]  # families whose layers are all alike: TinyBERT's spacing
    distill = {**CHAIN[2], "student": {"layers": [0, 2]}}
    with pytest.raises(RecipeError, match=r"student\.layers: layers are global every 2 layers .* \[2\] would change"):
        load_recipe(family_recipe("modernbert", [CHAIN[0], distill]))
    ok = {**CHAIN[2], "student": {"num_layers": 2}}
    assert load_recipe(family_recipe("modernbert", [CHAIN[0], ok])).stages[1].student.num_layers == 2


def xlmr_style_bert(folder: Path, corpus: list[str]) -> Path:
    """The shape of multilingual-e5: a BERT encoder behind an XLM-R-style sentencepiece (Unigram) tokenizer, which
    returns no token_type_ids although the BERT graph takes them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    tokenizer = XLMRobertaTokenizerFast(tokenizer_object=tok, model_max_length=64)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_bert_graph_behind_a_sentencepiece_tokenizer_runs_evaluation_and_serving(family_recipe, tmp_path):
    """The run that crashed with KeyError 'token_type_ids' after `export`: now every stage, gate and the served
    runtime work, and the service's answers are evaluation's."""
    import numpy as np
    from conftest import toy_examples
    from transformers import AutoTokenizer

    from toolkit.manifest import Artifact
    from toolkit.serving.bundle import write_bundle
    from toolkit.serving.model import ServedModel

    folder = xlmr_style_bert(tmp_path / "e5-like", [t for t, _ in toy_examples(400)])
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(folder)(["a text"])
    path = family_recipe("bert", stages=[CHAIN[0], *CHAIN[3:]])
    recipe = json.loads(path.read_text())
    recipe["model"]["name"] = str(folder)
    path.write_text(json.dumps(recipe))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    run_dir = path.parent / "run"
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    for name in ("export", "optimize", "quantize"):
        assert stages[name]["gate"]["passed"], (name, stages[name]["gate"])
    assert stages["export"]["evaluation"]["parity"]["agreement"] == 1.0  # evaluated after export, no KeyError
    artifact = Artifact(Path(stages["optimize"]["output"]["path"]), "onnx", "optimize")
    write_bundle(
        artifact, tmp_path / "bundle", {"format": "onnx", "labels": ["negative", "positive"], "max_length": 16}
    )
    served = ServedModel(tmp_path / "bundle", threads=1, device="cpu")
    from toolkit.data import PreparedData

    data = PreparedData(run_dir / "data", ["negative", "positive"], "")
    texts = data.texts("test")
    evaluated = np.load(run_dir / "evals" / "optimize.logits.npy")
    served_logits = np.concatenate([served.logits(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    np.testing.assert_array_equal(served_logits, evaluated)
