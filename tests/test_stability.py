import math
from pathlib import Path

import polars as pl
import pytest
import torch

from postdiff.method import surrogate
from postdiff.outputs import stability
from postdiff.workflow.io import write_json
from postdiff.workflow.runtime import Job


def test_best_match_recovers_a_signed_scaled_permutation():
    g = torch.Generator().manual_seed(0)
    D_a = torch.randn(20, 16, generator=g)
    perm = torch.randperm(20, generator=g)
    sign = torch.where(torch.rand(20, generator=g) < 0.5, -1.0, 1.0)
    scale = 0.5 + 2 * torch.rand(20, generator=g)
    D_b = (sign * scale)[:, None] * D_a[perm] + 1e-4 * torch.randn(20, 16, generator=g)
    index, cos = stability.best_match(D_a, D_b)
    # Row perm[i] of D_a is row i of D_b.
    assert torch.equal(index[perm], torch.arange(20))
    # The 1e-4 noise tilts each row by ~1e-4 rad, 1 - cos ~ 1e-8; fp32 cosines round by ~1e-7
    # either side of 1 (measured: up to 1.2e-7 below and 2.4e-7 above, under default, avx2, avx512).
    assert cos.min().item() > 1 - 1e-6 and cos.max().item() <= 1 + 1e-6


def test_best_match_of_unrelated_dictionaries_is_far_from_one():
    g = torch.Generator().manual_seed(1)
    _, cos = stability.best_match(torch.randn(20, 256, generator=g), torch.randn(50, 256, generator=g))
    # Random directions in 256 dimensions: |cos| ~ 1/16, the best of 50 stays well below 0.5.
    assert cos.max().item() < 0.4 and cos.min().item() > 0.05


def test_best_match_edge_cases():
    D = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    index, cos = stability.best_match(D, torch.empty(0, 2))
    assert index.tolist() == [-1, -1, -1] and torch.isnan(cos).all()
    index, cos = stability.best_match(torch.empty(0, 2), D)
    assert index.shape == cos.shape == (0,)
    # The zero row matches nothing (cos 0, not NaN); ties go to the lower index.
    index, cos = stability.best_match(D, torch.tensor([[0.0, 0.0], [0.0, -2.0], [0.0, 1.0]]))
    assert index.tolist() == [0, 0, 1]
    assert cos.tolist() == pytest.approx([0.0, 0.0, 0.8])  # fp32's 0.8 is 1.2e-8 off; approx allows 1e-6
    with pytest.raises(ValueError, match=r"\[n_a, d\] and \[n_b, d\], got \(3, 2\) and \(1, 3\)"):
        stability.best_match(D, torch.ones(1, 3))


E = torch.eye(4)
S = 2**-0.5
# Seed 1's layer-0 dictionary: -2 e1, 0.6 e0 + 0.8 e3, e2, e3; its layer 1 replaces e2 by (e2 + e3)/sqrt 2.
DECODERS = {
    0: {0: E.clone(), 1: E.clone()},
    1: {0: torch.tensor([[0.0, -2, 0, 0], [0.6, 0, 0, 0.8], [0, 0, 1, 0], [0, 0, 0, 1]]),
        1: torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 3 * S, 3 * S], [0, 0, 0, 1]])},
}
MASKS = {0: {0: [0, 1], 1: [2]}, 1: {0: [0, 1, 2]}}


def _rows(frame: pl.DataFrame) -> list[tuple]:
    # Cosines come from fp32 (0.6 is 0.6000000238): six decimals drop that ~1e-7 rounding and
    # still tell every hand-made value apart.
    return [tuple(round(x, 6) if isinstance(x, float) and not math.isnan(x) else x for x in row)
            for row in frame.drop("mask").iter_rows()]


def test_mask_stability_known_matches_within_layers_only():
    frame = stability.mask_stability(MASKS, DECODERS, "CapMask")
    assert frame.schema == pl.Schema(stability.STABILITY_SCHEMA)
    assert frame["mask"].unique().to_list() == ["CapMask"]
    rows = _rows(frame)
    # seed, other, layer, feature, in-mask feature, cos, dictionary feature, cos
    assert rows[:2] == [(0, 1, 0, 0, 1, 0.6, 1, 0.6), (0, 1, 0, 1, 0, 1.0, 0, 1.0)]
    # Seed 1's mask has e2 exactly, but at layer 0: seed 0's layer-1 e2 has no in-mask match.
    assert rows[2][:5] == (0, 1, 1, 2, -1) and math.isnan(rows[2][5])
    assert rows[2][6:] == (2, round(S, 6))
    assert rows[3:] == [(1, 0, 0, 0, 1, 1.0, 1, 1.0), (1, 0, 0, 1, 0, 0.6, 3, 0.8),
                        (1, 0, 0, 2, 0, 0.0, 2, 1.0)]


def test_mask_stability_with_empty_masks():
    frame = stability.mask_stability({0: MASKS[0], 1: {}}, DECODERS, "VMask")
    assert frame["seed"].to_list() == [0, 0, 0]
    assert frame["best_in_mask_feature"].to_list() == [-1, -1, -1]
    assert frame["best_in_mask_cos"].is_nan().all()
    assert frame["best_in_dictionary_feature"].to_list() == [1, 0, 2]
    empty = stability.mask_stability({0: {}, 1: {0: []}}, DECODERS, "VMask")
    assert empty.height == 0 and empty.schema == pl.Schema(stability.STABILITY_SCHEMA)
    with pytest.raises(ValueError, match=r"seed 1 layer 0: features \[0, 7\] outside its 4-feature"):
        stability.mask_stability({0: {0: [1]}, 1: {0: [0, 7]}}, DECODERS, "VMask")
    with pytest.raises(ValueError, match="CapMask: no decoder for layer 2 of seed 0"):
        stability.mask_stability({0: {2: [1]}, 1: {}}, DECODERS, "CapMask")


def test_stability_summary_known_answer():
    masks = {**MASKS, 2: {}}
    decoders = {**DECODERS, 2: DECODERS[0]}
    frame = stability.mask_stability(masks, decoders, "CapMask")
    summary = stability.stability_summary(frame, {"CapMask": {0: 3, 1: 3, 2: 0}})
    assert summary.schema == pl.Schema(stability.SUMMARY_SCHEMA)
    by_pair = {(r["seed"], r["other_seed"]): r for r in summary.iter_rows(named=True)}
    assert list(by_pair) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    r = by_pair[0, 1]
    assert (r["mask_size"], r["other_mask_size"], r["threshold"]) == (3, 3, 0.9)
    assert (r["in_mask_matched"], r["in_dictionary_matched"]) == (1, 1)
    # The layer-1 feature has no counterpart in seed 1's mask: it counts 0. Means of fp32
    # cosines (~1e-8 off 0.6, 0.8, 1/sqrt 2): approx's default 1e-6 relative.
    assert r["mean_in_mask_cos"] == pytest.approx(1.6 / 3)
    assert r["mean_in_dictionary_cos"] == pytest.approx((1.6 + S) / 3)
    r = by_pair[1, 0]
    assert (r["in_mask_matched"], r["in_dictionary_matched"]) == (1, 2)
    assert (r["mean_in_mask_cos"], r["mean_in_dictionary_cos"]) == pytest.approx((1.6 / 3, 2.8 / 3))
    r = by_pair[0, 2]  # same dictionary, empty mask
    assert (r["mean_in_mask_cos"], r["mean_in_dictionary_cos"], r["in_dictionary_matched"]) == (0.0, 1.0, 3)
    r = by_pair[2, 0]
    assert (r["mask_size"], r["in_mask_matched"]) == (0, 0) and math.isnan(r["mean_in_mask_cos"])


def _save_surrogate(path: Path, W_dec: torch.Tensor, layer: int, seed: int) -> str:
    module = surrogate.TopKSurrogate(W_dec.shape[1], W_dec.shape[0], k=1)
    with torch.no_grad():
        module.W_dec.copy_(W_dec)
    surrogate.save(module, path, {"layer": layer, "seed": seed})
    return str(path)


def test_stability_stage(tmp_path):
    modules = [_save_surrogate(tmp_path / f"s{seed}_l{layer}.safetensors", DECODERS[seed][layer], layer, seed)
               for seed in (0, 1) for layer in (0, 1)]
    masks = []
    for seed in (0, 1):
        for name, mask in (("CapMask", MASKS[seed]), ("VMask", {0: [3]} if seed == 0 else {})):
            masks.append(str(tmp_path / f"s{seed}_{name}.json"))
            write_json({"rule": name, "mask": {str(k): v for k, v in mask.items()}}, masks[-1])
    out = {"parquet": str(tmp_path / "stability.parquet"), "csv": str(tmp_path / "stability.csv")}
    params = {"seeds": [0, 1], "layers": [0, 1], "mask_names": ["CapMask", "VMask"]}
    stability.stability(Job(input={"modules": modules, "masks": masks}, output=out, params=params))
    matches = pl.read_parquet(out["parquet"])
    expected = pl.concat([stability.mask_stability(MASKS, DECODERS, "CapMask"),
                          stability.mask_stability({0: {0: [3]}, 1: {}}, DECODERS, "VMask")])
    assert matches.equals(expected)
    summary = pl.read_csv(out["csv"])
    assert summary.select("mask", "seed", "other_seed", "mask_size", "other_mask_size").rows() == [
        ("CapMask", 0, 1, 3, 3), ("CapMask", 1, 0, 3, 3), ("VMask", 0, 1, 1, 0), ("VMask", 1, 0, 0, 1)]
    # VMask's e3 of seed 0 is row 3 of seed 1's layer-0 dictionary.
    assert summary.row(2, named=True)["in_dictionary_matched"] == 1
    with pytest.raises(ValueError, match="surrogate of layer 1 seed 0, expected layer 0 seed 0"):
        stability.stability(Job(input={"modules": [modules[1], modules[0], *modules[2:]], "masks": masks},
                            output=out, params=params))
