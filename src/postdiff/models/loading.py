"""Loading the PT/IT pair and finding its decoder blocks (SPEC §1)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from postdiff.models.families import family_of
from postdiff.models.template import prefix_bos, prefix_disagreement
from postdiff.workflow.runtime import gc_paused

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# owner/name or a bare name, as the hub spells them; anything else must be an existing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_WEIGHTS = ("*.safetensors", "*.bin")


class Pair(NamedTuple):
    pt: nn.Module
    it: nn.Module
    tokenizer: object


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def pick_dtype(dtype: str = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """bf16 on a GPU that supports it, fp32 otherwise (CPU bf16 matmuls are slow and lossy)."""
    if dtype == "auto":
        dev = pick_device(str(device))
        cuda_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _is_local(spec: str) -> bool:
    """True for an existing directory; raise for a path-like spec that does not exist."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {spec!r} has no config.json")
        return True
    if path.exists():
        raise FileNotFoundError(f"model {spec!r} is a file, not a Hugging Face model directory")
    if not _HUB_ID.match(spec) or ".." in spec:
        raise FileNotFoundError(f"model {spec!r}: no such directory, and not a Hugging Face hub id")
    return False


def _hub_cached(spec: str) -> str | None:
    """Path of the cached config.json of hub id ``spec`` (the cache's ``main``), or None."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(spec, "config.json")
    return hit if isinstance(hit, str) else None


def loads_locally(spec: str) -> bool:
    """Whether ``from_pretrained`` may skip the network; fails fast when the model is nowhere.

    The hub client retries an unreachable host for ~25 s, so existence is checked first with a
    single request.
    """
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    if _is_local(spec) or _hub_cached(spec) is not None:
        return True
    if huggingface_hub.is_offline_mode():
        raise FileNotFoundError(f"model {spec!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        huggingface_hub.model_info(spec, timeout=10)
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"model {spec!r} not found on the Hugging Face hub") from e
    except Exception as e:  # noqa: BLE001 - any network failure means the model cannot be fetched
        raise FileNotFoundError(
            f"model {spec!r} is not a local directory or cached, and the hub is unreachable: {e}"
        ) from e
    return False


def load_tokenizer(spec: str, local_only: bool | None = None):
    from transformers import AutoTokenizer

    local = loads_locally(spec) if local_only is None else local_only
    tok = AutoTokenizer.from_pretrained(spec, local_files_only=local)
    # Batched generate needs left padding, or shorter rows decode garbage after their pads.
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {spec!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _eos_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def generation_eos(spec: str, local_only: bool | None = None) -> list[int]:
    """EOS ids of the generation config of ``spec`` (none when it ships no generation config)."""
    from transformers import GenerationConfig

    local = loads_locally(spec) if local_only is None else local_only
    try:
        config = GenerationConfig.from_pretrained(spec, local_files_only=local)
    except OSError:
        return []
    return _eos_list(config.eos_token_id)


def stop_set(*eos_values: int | list[int] | None) -> list[int]:
    """The sorted union of EOS values: tokenizers' EOS ids and generation-config EOS (int, list or None)."""
    ids = {i for value in eos_values for i in _eos_list(value)}
    if not ids:
        raise ValueError("neither the tokenizer nor any generation config names an EOS token")
    return sorted(ids)


def pair_stop_ids(*specs: str, tokenizer=None) -> list[int]:
    """The stop set of a pair: the EOS of every tokenizer and every EOS id in the generation
    configs of ``specs``. Gemma 3 IT stops on ``<end_of_turn>`` as well as ``<eos>`` and its PT on
    ``<eos>`` alone; a steered PT that emits ``<end_of_turn>`` must stop where the IT teacher
    stops. The tokenizers count too: SmolLM2's and Qwen's PT and IT tokenizers name different
    EOS tokens. ``tokenizer``: the already loaded tokenizer of ``specs[0]``."""
    tokenizers = [tokenizer if tokenizer is not None else load_tokenizer(specs[0]), *(load_tokenizer(spec) for spec in specs[1:])]
    eos = [tok.eos_token_id for tok in tokenizers]
    return stop_set(*eos, *(generation_eos(spec) for spec in specs))


def cpu_attention(device: torch.device, dtype: torch.dtype) -> str | None:
    """``"eager"`` where torch's fused attention cannot run: its CPU bf16 kernel needs AVX-512
    kernels and raises "pack_vnni2 is only supported when avx512 is supported" from 64 tokens
    on under ``ATEN_CPU_CAPABILITY`` avx2 or default (torch 2.13). Elsewhere ``None``: the
    model's own choice."""
    if device.type == "cpu" and dtype == torch.bfloat16 and "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return "eager"
    return None


@gc_paused()  # the first load imports transformers' model code: seconds of Python objects
def load_model(
    spec: str, dtype: str = "auto", device: str = "auto", partner: str | None = None
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` from a hub id or local HF directory, in eval mode without grads.

    The model's generation config is set to stop on :func:`pair_stop_ids` of ``spec`` and its
    ``partner`` (the other model of the pair), so PT and IT generate under one stop set.
    """
    from transformers import AutoModelForCausalLM

    local = loads_locally(spec)
    tok = load_tokenizer(spec, local_only=local)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    log.info("loading %s (%s on %s)", spec, torch_dtype, dev)
    attention = cpu_attention(torch.device(dev), torch_dtype)
    if attention:
        log.info("%s on a CPU without AVX-512 kernels: %s attention", torch_dtype, attention)
    # No device_map: that would make `accelerate` a hard dependency for a single-device load.
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype, local_files_only=local,
                                                 **({"attn_implementation": attention} if attention else {}))
    model.to(dev).eval().requires_grad_(False)
    model.generation_config.eos_token_id = pair_stop_ids(spec, *([partner] if partner else []), tokenizer=tok)
    log.info("%s stops on ids %s", spec, model.generation_config.eos_token_id)
    return model, tok


def vocab_mismatch(spec_a: str, tok_a, spec_b: str, tok_b) -> str | None:
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va == vb:
        return None
    differ = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])
    shown = ", ".join(f"{t!r}->{i}" for t, i in differ[:5])
    return (
        f"tokenizers of {spec_a!r} ({len(va)} tokens) and {spec_b!r} ({len(vb)} tokens) differ "
        f"in {len(differ)} (token, id) entries, e.g. {shown}"
    )


def text_config(spec: str):
    """The text model's config of ``spec`` (inside multimodal wrappers too), without weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec, local_files_only=loads_locally(spec)).get_text_config()


def family_prefix_problem(pt: str, it: str, it_tokenizer) -> str | None:
    """Why a tested family's tokenizer would open prefixes otherwise than its entry in
    :mod:`postdiff.models.families` says (a hub revision changed its files), or None."""
    family = family_of(pt, it)
    bos = prefix_bos(it_tokenizer)
    got = None if bos is None else it_tokenizer.convert_ids_to_tokens(bos)
    if family is None or got == family.prefix:
        return None
    return (f"its tokenizer opens every prefix with {got or 'no BOS'}, but {family.name}'s published one opens "
            f"them with {family.prefix or 'no BOS'} (postdiff.models.families): check its files before trusting results")


def pair_mismatches(pt: str, it: str) -> list[str]:
    """Why PT and IT cannot be compared token by token: different tokenizer vocabularies or
    embedding sizes, or prefixes that open with a BOS one of them was not trained with. Reads
    tokenizers and configs only."""
    problems = []
    toks = {"pt": load_tokenizer(pt), "it": load_tokenizer(it)}
    if msg := vocab_mismatch(pt, toks["pt"], it, toks["it"]):
        problems.append(msg)
    problems += [m for m in (prefix_disagreement(toks["pt"], toks["it"]), family_prefix_problem(pt, it, toks["it"])) if m]
    sizes = {"pt": text_config(pt).vocab_size, "it": text_config(it).vocab_size}
    if sizes["pt"] != sizes["it"]:
        problems.append(f"embedding vocab sizes differ: {pt!r} has {sizes['pt']} embedding rows, "
                        f"{it!r} has {sizes['it']}")
    return problems


def load_pair(pt: str, it: str, dtype: str = "auto", device: str = "auto") -> Pair:
    """Load PT and IT, refusing a pair with different vocabularies before any weights load."""
    if problems := pair_mismatches(pt, it):
        raise ValueError("refusing model pair: " + "; ".join(problems))
    pt_model, _ = load_model(pt, dtype, device, partner=it)
    it_model, it_tok = load_model(it, dtype, device, partner=pt)
    return Pair(pt_model, it_model, it_tok)


def _decoder_part(model: nn.Module, name: str, kind: type[nn.Module]) -> nn.Module:
    """Attribute `name` of a causal LM's decoder, also inside multimodal wrappers (Gemma 3 4B)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    part = getattr(decoder, name, None)
    if not isinstance(part, kind):
        raise ValueError(f"cannot find the decoder's {name} in {type(model).__name__}")
    return part


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks."""
    return _decoder_part(model, "layers", nn.ModuleList)


def skeleton(spec: str) -> nn.Module:
    """The causal LM that ``spec`` names, built on the meta device: its module tree, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(spec, local_files_only=loads_locally(spec))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm before the unembedding."""
    return _decoder_part(model, "norm", nn.Module)


def structure_problem(spec: str) -> str | None:
    """Why the workflow could not hook ``spec``'s decoder blocks or read its final norm, from its
    class built on the meta device (the config only, no weights; milliseconds for a 7B model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, __version__

    config = AutoConfig.from_pretrained(spec, local_files_only=loads_locally(spec))
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError:  # a config class that no causal LM of this transformers takes
        return f"transformers {__version__} builds no causal LM from its {type(config).__name__}"
    try:
        decoder_layers(model)
        final_norm(model)
    except ValueError as err:
        return f"{err}: the workflow hooks `model.get_decoder().layers` and reads `.norm`"
    return None


def check_layers(model: nn.Module, layers: Iterable[int]) -> list[int]:
    n = len(decoder_layers(model))
    checked = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(
                f"layer {layer!r} is not a decoder layer of {type(model).__name__}: "
                f"valid layers are 0..{n - 1}"
            )
        checked.append(layer)
    return checked


def _hash_dir(path: Path) -> str:
    files = sorted(
        {path / "config.json", *(f for pat in _WEIGHTS for f in path.glob(pat))}, key=lambda f: f.name
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(spec: str) -> str:
    """sha256 over config and weight bytes of a local dir; ``repo@commit`` for a hub id."""
    if _is_local(spec):
        return _hash_dir(Path(spec).expanduser())
    cached = _hub_cached(spec)
    if cached is not None:
        return f"{spec}@{Path(cached).parent.name}"
    loads_locally(spec)  # raises a clear error when the hub cannot be reached
    import huggingface_hub

    return f"{spec}@{huggingface_hub.model_info(spec, timeout=10).sha}"


def gemma3_text_config(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    sliding_window: int = 64,
):
    """A small valid ``Gemma3TextConfig``: its defaults (262k vocab, head_dim 256) are for 1B+."""
    from transformers import Gemma3TextConfig

    head_dim = hidden_size // num_heads
    # Gemma 3's pattern: five sliding-window layers, then one full-attention layer.
    types = ["full_attention" if (i + 1) % 6 == 0 or i == num_layers - 1 else "sliding_attention"
             for i in range(num_layers)]
    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window,
        layer_types=types,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
