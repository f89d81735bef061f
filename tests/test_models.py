import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from postdiff.models.loading import (
    check_layers,
    cpu_attention,
    decoder_layers,
    fingerprint,
    gemma3_text_config,
    load_model,
    load_pair,
    pick_device,
    pick_dtype,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def byte_tokenizer(extra: tuple[str, ...] = (), pad: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges: Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(extra) + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    named = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", **named
    )


def save_tiny(path: Path, seed: int = 0, extra: tuple[str, ...] = (), pad: bool = True, vocab_size=None) -> Path:
    """A tiny random Gemma 3 and its tokenizer saved as a local HF directory."""
    tok = byte_tokenizer(extra, pad)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(gemma3_text_config(vocab_size or len(tok), 32, 2, num_heads=2, num_kv_heads=1))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=1)


def multimodal_gemma3() -> Gemma3ForConditionalGeneration:
    text = gemma3_text_config(64, 32, 3, num_heads=2, num_kv_heads=1).to_dict()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    return Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        image_token_index=63, boi_token_index=61, eoi_token_index=62))


@pytest.mark.parametrize(
    ("build", "inner"),
    [
        (lambda: LlamaForCausalLM(LlamaConfig(**SMALL)), lambda m: m.model.layers),
        (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)), lambda m: m.model.layers),
        (lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=16)), lambda m: m.model.layers),
        (lambda: Gemma3ForCausalLM(gemma3_text_config(64, 32, 3, num_heads=2, num_kv_heads=1)),
         lambda m: m.model.layers),
        (multimodal_gemma3, lambda m: m.model.language_model.layers),
    ],
    ids=["llama", "qwen2", "gemma2", "gemma3", "gemma3-multimodal"],
)
def test_decoder_layers_finds_the_text_blocks(build, inner):
    model = build()
    layers = decoder_layers(model)
    assert layers is inner(model)
    assert len(layers) == 3
    assert type(layers[0]).__name__.endswith("DecoderLayer")


def test_decoder_layers_rejects_a_model_without_blocks():
    with pytest.raises(ValueError, match="Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_check_layers_names_bad_layer_and_range():
    model = Gemma3ForCausalLM(gemma3_text_config(64, 32, 3, num_heads=2, num_kv_heads=1))
    assert check_layers(model, [0, 2]) == [0, 2]
    for bad in (3, -1, "1", 1.0):
        with pytest.raises(ValueError, match=r"layer .* valid layers are 0\.\.2"):
            check_layers(model, [0, bad])


def test_gemma3_text_config_has_small_heads_and_gemma_layer_pattern():
    config = gemma3_text_config(1024, 192, 8)
    assert (config.head_dim, config.query_pre_attn_scalar, config.vocab_size) == (48, 48, 1024)
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention", "full_attention"]


def test_cpu_defaults_and_bad_names():
    if not torch.cuda.is_available():
        assert pick_device() == torch.device("cpu")
        assert pick_dtype("auto", "cpu") == torch.float32
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")
    assert pick_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="'fp8'"):
        pick_dtype("fp8")


def test_load_model_from_local_dir(tmp_path):
    spec = str(save_tiny(tmp_path / "m", pad=False))
    model, tok = load_model(spec, device="cpu")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tok.padding_side == "left"
    assert tok.pad_token_id == tok.eos_token_id == 1  # no pad token saved: falls back to eos


@pytest.mark.parametrize("spec", ["/no/such/model/dir", "./missing-model", "a/b/c"])
def test_missing_local_model_fails_fast_naming_it(spec):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=spec):
        load_model(spec)
    assert time.monotonic() - start < 5


def test_uncached_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="postdiff-tests/no-such-model.*HF_HUB_OFFLINE"):
        load_model("postdiff-tests/no-such-model")
    assert time.monotonic() - start < 5


def test_dir_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_load_pair_loads_a_matching_pair(tmp_path):
    pair = load_pair(str(save_tiny(tmp_path / "pt", 0)), str(save_tiny(tmp_path / "it", 1)), device="cpu")
    assert not torch.equal(pair.pt.lm_head.weight, pair.it.lm_head.weight)
    assert pair.tokenizer.padding_side == "left"


def test_load_pair_refuses_other_tokenizer_before_loading_weights(tmp_path):
    pt = save_tiny(tmp_path / "pt")
    it = save_tiny(tmp_path / "it", extra=("<end_of_turn>",))
    (it / "model.safetensors").unlink()  # loading weights would fail with another error
    with pytest.raises(ValueError, match="refusing model pair: tokenizers .* differ in [0-9]+"):
        load_pair(str(pt), str(it))


def test_load_pair_refuses_other_embedding_size(tmp_path):
    pt = save_tiny(tmp_path / "pt")
    it = save_tiny(tmp_path / "it", vocab_size=300)
    (it / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="vocab sizes differ.* 260.* 300"):
        load_pair(str(pt), str(it))


def test_fingerprint_follows_weight_bytes(tmp_path):
    a = save_tiny(tmp_path / "a", seed=0)
    b = save_tiny(tmp_path / "b", seed=0)
    c = save_tiny(tmp_path / "c", seed=1)
    fa = fingerprint(str(a))
    assert len(fa) == 64
    assert fa == fingerprint(str(b)) != fingerprint(str(c))
    (b / "tokenizer.json").write_text("{}")  # tokenizer files are not weights
    assert fingerprint(str(b)) == fa


def test_fingerprint_of_uncached_hub_id_offline_fails(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="postdiff-tests/no-such-model"):
        fingerprint("postdiff-tests/no-such-model")


def test_bf16_on_a_cpu_without_avx512_kernels_runs_eager_attention(monkeypatch):
    """torch's fused CPU attention in bf16 raises from 64 tokens on unless AVX-512 kernels run;
    the loader then picks eager attention, and a 100-token bf16 forward of the rehearsal twin runs
    under every ATEN_CPU_CAPABILITY."""
    cpu = torch.device("cpu")
    for capability, want in (("AVX512", None), ("AVX2", "eager"), ("DEFAULT", "eager")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert cpu_attention(cpu, torch.bfloat16) == want
        assert cpu_attention(cpu, torch.float32) is None
    assert cpu_attention(torch.device("cuda"), torch.bfloat16) is None
    monkeypatch.undo()
    twin = next((Path(__file__).resolve().parents[1] / "workflow/resources/hf_home/hub"
                 / "models--postdiff-rehearsal--gemma-3-tiny-pt/snapshots").iterdir())
    model, _ = load_model(str(twin), "bfloat16", "cpu")
    ids = torch.randint(5, 500, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()).all()
