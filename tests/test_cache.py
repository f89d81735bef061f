import json

import polars as pl
import pytest
import torch
from safetensors import safe_open
from transformers import Gemma3ForCausalLM

from postdiff.method.cache import (
    Expect,
    answer_index,
    cache_shard,
    check_shard,
    collect,
    load_split,
    token_hash,
    write_shard,
)
from postdiff.method.standardise import (
    floor_sigma,
    load_standardiser,
    standardiser,
    standardiser_from,
)
from postdiff.models.loading import decoder_layers, fingerprint, gemma3_text_config
from postdiff.models.toy.tokenizer import train_tokenizer
from postdiff.workflow.runtime import Job
from postdiff.workflow.shards import shard_rows

V, D = 64, 32
FPS = {"pt": "fp-pt", "it": "fp-it"}



def tiny(seed: int, vocab: int = V) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(gemma3_text_config(vocab, D, 3, num_heads=2, num_kv_heads=1, sliding_window=8)).eval()


@pytest.fixture(scope="module")
def pair():
    return tiny(0), tiny(1)


def make_rows(n: int, seed: int, vocab: int = V, prefix: str = "p") -> pl.DataFrame:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n, 2), generator=g).tolist()
    return pl.DataFrame(
        {
            "id": [f"{prefix}{i}" for i in range(n)],
            "prefix_ids": [torch.randint(4, vocab - 1, (m + 2,), generator=g).tolist() for m, _ in lengths],
            "token_ids": [torch.randint(4, vocab - 1, (a,), generator=g).tolist() for _, a in lengths],
        }
    )


@pytest.fixture(scope="module")
def rows():
    return make_rows(7, seed=0)


@pytest.fixture(scope="module")
def collected(pair, rows):
    return collect(*pair, [0, 1], rows, batch_size=3)


def test_collect_equals_unbatched_hidden_states(pair, rows, collected):
    caches, index = collected
    pt, it = pair
    offset = 0
    for pid, prefix, answer in rows.iter_rows():
        ids = torch.tensor([prefix + answer])
        pos = list(range(len(prefix) - 1, len(prefix) + len(answer) - 1))
        sl = slice(offset, offset + len(pos))
        assert index["id"][sl].to_list() == [pid] * len(pos) and index["position"][sl].to_list() == pos
        with torch.no_grad():
            hs_pt = pt(input_ids=ids, output_hidden_states=True).hidden_states
            hs_it = it(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in (0, 1):  # hidden_states[l + 1] is block l's output except after the last block
            h_pt, delta = caches[layer]
            # Padded batches of 3 against one unpadded row may reorder fp32 reductions (~1e-6 at
            # activations <= 8.4); measured bit-identical under default, avx2 and avx512.
            assert torch.allclose(h_pt[sl], hs_pt[layer + 1][0, pos], atol=1e-5)
            assert torch.allclose(delta[sl], hs_it[layer + 1][0, pos] - hs_pt[layer + 1][0, pos], atol=1e-5)
        offset += len(pos)
    assert offset == index.height == caches[0][0].shape[0]


def test_collect_is_batch_size_invariant_and_casts(pair, rows, collected):
    caches, index = collected
    again, index_again = collect(*pair, [0, 1], rows, batch_size=1)
    assert index.equals(index_again)
    for layer in (0, 1):
        for a, b in zip(caches[layer], again[layer]):
            # Batch sizes 3 and 1 pad differently: as above, measured bit-identical.
            assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5)
    bf16, _ = collect(*pair, [1], rows, batch_size=4, dtype=torch.bfloat16)
    assert list(bf16) == [1] and bf16[1][0].dtype == torch.bfloat16
    # One bf16 rounding of the fp32 delta: <= 2^-8 = 3.9e-3 relative (measured 3.7e-3).
    assert torch.allclose(bf16[1][1].float(), caches[1][1], rtol=1e-2, atol=1e-2)


def test_collect_names_layer_and_prompt_of_non_finite_activations(pair, rows):
    pt, it = pair
    marked = rows.with_columns(pl.Series("token_ids", [a + ([V - 1] if i == 4 else []) for i, a in enumerate(rows["token_ids"].to_list())]))

    current_ids = None

    def remember(_module, _args, kwargs):
        nonlocal current_ids
        current_ids = kwargs["input_ids"]

    def poison(_module, _args, output):
        return output.masked_fill((current_ids == V - 1).any(-1)[:, None, None], float("nan"))

    handles = [it.register_forward_pre_hook(remember, with_kwargs=True), decoder_layers(it)[1].register_forward_hook(poison)]
    try:
        with pytest.raises(ValueError, match=r"IT activations at layer 1 for prompt id 'p4'"):
            collect(pt, it, [0, 1, 2], marked, batch_size=3)
    finally:
        for handle in handles:
            handle.remove()


def test_bad_rows_are_refused_before_compute(pair, rows):
    with pytest.raises(ValueError, match="token_ids"):
        collect(*pair, [0], rows.drop("token_ids"), batch_size=2)
    empty = rows.with_columns(pl.Series("token_ids", [[]] + rows["token_ids"].to_list()[1:]))
    with pytest.raises(ValueError, match="'p0'"):
        collect(*pair, [0], empty, batch_size=2)
    with pytest.raises(ValueError, match="duplicate"):
        collect(*pair, [0], pl.concat([rows, rows[:1]]), batch_size=2)
    with pytest.raises(ValueError, match="layer 5"):
        collect(*pair, [5], rows, batch_size=2)


def test_shards_are_strided_disjoint_and_hashed(rows):
    parts = [shard_rows(rows, s, 3) for s in range(3)]
    assert parts[1]["id"].to_list() == ["p1", "p4"]
    assert sorted(pid for p in parts for pid in p["id"].to_list()) == sorted(rows["id"].to_list())
    with pytest.raises(ValueError, match="shard 3"):
        shard_rows(rows, 3, 3)
    changed = rows.with_columns(pl.Series("token_ids", [[5]] + rows["token_ids"].to_list()[1:]))
    assert token_hash(rows) == token_hash(rows.clone()) != token_hash(changed)
    assert answer_index(rows[:1])["position"].to_list() == list(range(len(rows["prefix_ids"][0]) - 1,
                                                                     len(rows["prefix_ids"][0]) + len(rows["token_ids"][0]) - 1))


def write_split(tmp_path, pair, rows, n_shards=2, layers=(0, 1)):
    paths = []
    for s in range(n_shards):
        part = shard_rows(rows, s, n_shards)
        caches, _ = collect(*pair, list(layers), part, batch_size=4)
        paths.append(str(tmp_path / f"shard{s}.safetensors"))
        write_shard(paths[-1], caches, part, FPS, s, n_shards)
    return paths


def test_shard_files_round_trip_and_refuse_stale_caches(tmp_path, pair, rows, collected):
    paths = write_split(tmp_path, pair, rows)
    h_pt, delta, index = load_split(paths, 1, Expect(layers=[0, 1], fingerprints=FPS, teacher=rows))
    caches, full_index = collected
    joined = full_index.with_row_index().join(index, on=["id", "position"], how="inner", maintain_order="right")
    order = joined["index"].to_torch().long()
    assert index.height == full_index.height
    # Shards run other batches (4 rows of a subset, not 3 of all): measured bit-identical, as above.
    assert torch.allclose(h_pt, caches[1][0][order], atol=1e-5) and torch.allclose(delta, caches[1][1][order], atol=1e-5)
    meta = check_shard(paths[0], [1, 0], FPS, token_hash(shard_rows(rows, 0, 2)))
    assert meta["ids"] == ["p0", "p2", "p4", "p6"]
    assert meta["n_tokens"] == sum(len(a) for a in shard_rows(rows, 0, 2)["token_ids"].to_list())
    with pytest.raises(ValueError, match="layers"):
        check_shard(paths[0], [0, 1, 2])
    with pytest.raises(ValueError, match="it model fingerprint"):
        check_shard(paths[0], [0, 1], {"pt": "fp-pt", "it": "other"})
    with pytest.raises(ValueError, match="token ids"):
        load_split(paths, 1, Expect(layers=[0, 1], teacher=make_rows(7, seed=9)))
    with pytest.raises(ValueError, match="cover"):
        load_split(paths[:1], 1, Expect(layers=[0, 1], teacher=rows))
    with pytest.raises(ValueError, match="layer 2"):
        load_split(paths, 2)
    with pytest.raises(FileNotFoundError):
        load_split([str(tmp_path / "nope.safetensors")], 1)


def test_standardiser_streams_shards_exactly(tmp_path, pair, rows):
    paths = write_split(tmp_path, pair, rows, n_shards=3)
    out = str(tmp_path / "std.safetensors")
    standardiser(Job(input={"shards": paths}, output={"standardiser": out}, params={"layers": [0, 1]}))
    h_pt, delta, _ = load_split(paths, 0)
    std = load_standardiser(out, 0)
    # Merged float64 moments against float64 moments of the whole split, each rounded once to
    # fp32: a few ulp at most (2^-23 = 1.2e-7 relative); measured identical.
    assert torch.allclose(std.mu, h_pt.double().mean(0).float(), rtol=1e-6, atol=0)
    assert torch.allclose(std.sigma, floor_sigma(h_pt.double().std(0, correction=0)).float(), rtol=1e-6, atol=0)
    assert torch.allclose(std.delta_mean, delta.double().mean(0).float(), rtol=1e-6, atol=0)
    with safe_open(out, framework="pt") as f:
        assert json.loads(f.metadata()["layers"]) == [0, 1] and int(f.metadata()["n_tokens"]) == h_pt.shape[0]
    with pytest.raises(ValueError, match="layer 2"):
        load_standardiser(out, 2)


def test_standardiser_is_exact_under_a_large_offset_and_floors_sigma():
    g = torch.Generator().manual_seed(0)
    x = 1e6 + torch.randn(3000, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    chunks = [(x[i : i + 700].float(), x[i : i + 700].float()) for i in range(0, 3000, 700)]
    std = standardiser_from(chunks)
    exact = torch.cat([c for c, _ in chunks]).double()
    # float64 moments rounded once to fp32: <= 6e-8 relative (measured 4.2e-8). fp32 moments,
    # or E[h^2] - E[h]^2 in float64, would lose every digit of sigma under the 1e6 offset.
    assert torch.allclose(std.sigma[:3].double(), exact.std(0, correction=0)[:3], rtol=1e-6)
    assert float(std.sigma[3]) == pytest.approx(1e-3 * float(exact.std(0, correction=0)[:4].median()), rel=1e-6)
    with pytest.raises(ValueError, match="no answer-phase"):
        standardiser_from([])


def test_cache_shard_stage_with_saved_pair(tmp_path):
    tok = train_tokenizer(["the capital of Avalon is Brightwater", "two plus two is four"], vocab_size=270)
    specs = {}
    for role, seed in (("pt", 0), ("it", 1)):
        specs[role] = str(tmp_path / role)
        tiny(seed, vocab=270).save_pretrained(specs[role])
        tok.save_pretrained(specs[role])
    teacher = make_rows(5, seed=3, vocab=270, prefix="q").with_columns(pl.lit("QA").alias("slice"))
    teacher.write_parquet(tmp_path / "teacher.parquet")
    out = {"tensors": str(tmp_path / "c.safetensors"), "index": str(tmp_path / "c.parquet")}
    params = {**specs, "layers": [2, 0], "shard": 1, "n_shards": 2, "batch_size": 2, "device": "cpu"}
    cache_shard(Job(input={"teacher": str(tmp_path / "teacher.parquet")}, output=out, params=params))
    meta = check_shard(out["tensors"], [0, 2], {r: fingerprint(s) for r, s in specs.items()}, token_hash(shard_rows(teacher, 1, 2)))
    assert meta["ids"] == ["q1", "q3"] and meta["dtype"] == "float32"
    index = pl.read_parquet(out["index"])
    assert index.columns == ["id", "position"] and index.height == meta["n_tokens"]
    h_pt, delta, loaded = load_split([out["tensors"]], 2)
    assert loaded.equals(index) and h_pt.shape == delta.shape == (index.height, D)
    with pytest.raises(ValueError, match="shard 7 of 8 is empty"):
        cache_shard(Job(input={"teacher": str(tmp_path / "teacher.parquet")}, output=out, params={**params, "shard": 7, "n_shards": 8}))
