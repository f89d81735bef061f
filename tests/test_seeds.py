import math
from pathlib import Path

import polars as pl
import pytest
import torch

from postdiff import seeds, surrogate
from postdiff.io import write_json
from postdiff.runtime import Job


def test_best_match_recovers_a_signed_scaled_permutation():
    g = torch.Generator().manual_seed(0)
    D_a = torch.randn(20, 16, generator=g)
    perm = torch.randperm(20, generator=g)
    sign = torch.where(torch.rand(20, generator=g) < 0.5, -1.0, 1.0)
    scale = 0.5 + 2 * torch.rand(20, generator=g)
    D_b = (sign * scale)[:, None] * D_a[perm] + 1e-4 * torch.randn(20, 16, generator=g)
    index, cos = seeds.best_match(D_a, D_b)
    # Row perm[i] of D_a is row i of D_b.
    assert torch.equal(index[perm], torch.arange(20))
    assert cos.min().item() > 1 - 1e-6 and cos.max().item() <= 1 + 1e-6


def test_best_match_of_unrelated_dictionaries_is_far_from_one():
    g = torch.Generator().manual_seed(1)
    _, cos = seeds.best_match(torch.randn(20, 256, generator=g), torch.randn(50, 256, generator=g))
    # Random directions in 256 dimensions: |cos| ~ 1/16, the best of 50 stays well below 0.5.
    assert cos.max().item() < 0.4 and cos.min().item() > 0.05


def test_best_match_edge_cases():
    D = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    index, cos = seeds.best_match(D, torch.empty(0, 2))
    assert index.tolist() == [-1, -1, -1] and torch.isnan(cos).all()
    index, cos = seeds.best_match(torch.empty(0, 2), D)
    assert index.shape == cos.shape == (0,)
    # The zero row matches nothing (cos 0, not NaN); ties go to the lower index.
    index, cos = seeds.best_match(D, torch.tensor([[0.0, 0.0], [0.0, -2.0], [0.0, 1.0]]))
    assert index.tolist() == [0, 0, 1]
    assert cos.tolist() == pytest.approx([0.0, 0.0, 0.8])
    with pytest.raises(ValueError, match=r"\[n_a, d\] and \[n_b, d\], got \(3, 2\) and \(1, 3\)"):
        seeds.best_match(D, torch.ones(1, 3))


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
    return [tuple(round(x, 6) if isinstance(x, float) and not math.isnan(x) else x for x in row)
            for row in frame.drop("mask").iter_rows()]


def test_mask_stability_known_matches_within_layers_only():
    frame = seeds.mask_stability(MASKS, DECODERS, "CapMask")
    assert frame.schema == pl.Schema(seeds.STABILITY_SCHEMA)
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
    frame = seeds.mask_stability({0: MASKS[0], 1: {}}, DECODERS, "VMask")
    assert frame["seed"].to_list() == [0, 0, 0]
    assert frame["best_in_mask_feature"].to_list() == [-1, -1, -1]
    assert frame["best_in_mask_cos"].is_nan().all()
    assert frame["best_in_dictionary_feature"].to_list() == [1, 0, 2]
    empty = seeds.mask_stability({0: {}, 1: {0: []}}, DECODERS, "VMask")
    assert empty.height == 0 and empty.schema == pl.Schema(seeds.STABILITY_SCHEMA)
    with pytest.raises(ValueError, match=r"seed 1 layer 0: features \[0, 7\] outside its 4-feature"):
        seeds.mask_stability({0: {0: [1]}, 1: {0: [0, 7]}}, DECODERS, "VMask")
    with pytest.raises(ValueError, match="CapMask: no decoder for layer 2 of seed 0"):
        seeds.mask_stability({0: {2: [1]}, 1: {}}, DECODERS, "CapMask")


def test_stability_summary_known_answer():
    masks = {**MASKS, 2: {}}
    decoders = {**DECODERS, 2: DECODERS[0]}
    frame = seeds.mask_stability(masks, decoders, "CapMask")
    summary = seeds.stability_summary(frame, {"CapMask": {0: 3, 1: 3, 2: 0}})
    assert summary.schema == pl.Schema(seeds.SUMMARY_SCHEMA)
    by_pair = {(r["seed"], r["other_seed"]): r for r in summary.iter_rows(named=True)}
    assert list(by_pair) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    r = by_pair[0, 1]
    assert (r["mask_size"], r["other_mask_size"], r["threshold"]) == (3, 3, 0.9)
    assert (r["in_mask_matched"], r["in_dictionary_matched"]) == (1, 1)
    # The layer-1 feature has no counterpart in seed 1's mask: it counts 0.
    assert r["mean_in_mask_cos"] == pytest.approx(1.6 / 3)
    assert r["mean_in_dictionary_cos"] == pytest.approx((1.6 + S) / 3)
    r = by_pair[1, 0]
    assert (r["in_mask_matched"], r["in_dictionary_matched"]) == (1, 2)
    assert (r["mean_in_mask_cos"], r["mean_in_dictionary_cos"]) == pytest.approx((1.6 / 3, 2.8 / 3))
    r = by_pair[0, 2]  # same dictionary, empty mask
    assert (r["mean_in_mask_cos"], r["mean_in_dictionary_cos"], r["in_dictionary_matched"]) == (0.0, 1.0, 3)
    r = by_pair[2, 0]
    assert (r["mask_size"], r["in_mask_matched"]) == (0, 0) and math.isnan(r["mean_in_mask_cos"])


NAN = math.nan
SEED3 = pl.DataFrame({"Variant": ["PT", "IT", "CapMask"], "KL": [1.0, 0.0, 0.8],
                      "Cap": [0.2, 0.6, 0.3], "CapRec": [NAN, 1.0, 0.25]})
# Seed 5: rows in another order, CapMask's CapRec undefined.
SEED5 = pl.DataFrame({"Variant": ["CapMask", "PT", "IT"], "KL": [0.6, 1.0, 0.0],
                      "Cap": [0.4, 0.2, 0.6], "CapRec": [NAN, NAN, NAN]})


def test_across_seeds_known_answer():
    table = seeds.across_seeds({3: SEED3, 5: SEED5})
    assert table.columns == ["Variant", "Metric", "seed_3", "seed_5", "n_finite", "mean", "min", "max"]
    assert table["Variant"].to_list() == ["PT"] * 3 + ["IT"] * 3 + ["CapMask"] * 3
    assert table["Metric"].to_list() == ["KL", "Cap", "CapRec"] * 3
    kl = table.filter((pl.col("Variant") == "CapMask") & (pl.col("Metric") == "KL")).row(0)
    assert kl[2:] == pytest.approx((0.8, 0.6, 2, 0.7, 0.6, 0.8))
    rec = table.filter((pl.col("Variant") == "CapMask") & (pl.col("Metric") == "CapRec")).row(0)
    assert rec[2] == 0.25 and math.isnan(rec[3]) and rec[4:] == (1, 0.25, 0.25, 0.25)
    none = table.filter((pl.col("Variant") == "PT") & (pl.col("Metric") == "CapRec")).row(0)
    assert none[4] == 0 and all(math.isnan(x) for x in none[5:])


def test_across_seeds_refuses_different_variants():
    other = SEED5.with_columns(pl.col("Variant").replace("CapMask", "VMask"))
    with pytest.raises(ValueError, match=r"seed 5: variants differ from seed 3's: missing \['CapMask'\], extra \['VMask'\]"):
        seeds.across_seeds({3: SEED3, 5: other})
    with pytest.raises(ValueError, match=r"seed 5: metric columns"):
        seeds.across_seeds({3: SEED3, 5: SEED5.drop("CapRec")})


def test_seed_table_and_figure_stages(tmp_path):
    paths = []
    for seed, frame in ((3, SEED3), (5, SEED5)):
        paths.append(str(tmp_path / f"seed{seed}" / "table1.csv"))
        Path(paths[-1]).parent.mkdir()
        frame.write_csv(paths[-1])
    out = {k: str(tmp_path / f"seeds.{k}") for k in ("csv", "md", "tex", "parquet")}
    seeds.seed_table(Job(input={"tables": paths}, output=out, params={"seeds": [3, 5]}))
    table = pl.read_parquet(out["parquet"])
    assert table.equals(seeds.across_seeds({3: SEED3, 5: SEED5}))
    assert pl.read_csv(out["csv"]).columns == table.columns
    md = Path(out["md"]).read_text().splitlines()
    assert md[0] == "| Variant | Metric | seed_3 | seed_5 | n_finite | mean | min | max |"
    assert md[-1] == "| CapMask | CapRec | 0.250 | n/a | 1 | 0.250 | 0.250 | 0.250 |"
    assert r"seed\_3 & seed\_5" in Path(out["tex"]).read_text()
    with pytest.raises(ValueError, match="one table per distinct seed, got 2 tables for seeds \\[3\\]"):
        seeds.seed_table(Job(input={"tables": paths}, output=out, params={"seeds": [3]}))

    figs = {k: str(tmp_path / f"seeds.{k}") for k in ("png", "pdf")}
    seeds.seed_figure(Job(input={"table": out["parquet"]}, output=figs))
    assert Path(figs["png"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(figs["pdf"]).read_bytes()[:4] == b"%PDF"
    fig = seeds.draw_seeds(table)
    assert [ax.get_title() for ax in fig.axes] == [
        "Cap (higher is better)", "CapRec (higher is better)", "KL (lower is better)"]
    # A metric no seed defines (CapRec of a pair with no gap) gets no panel; a partly defined one
    # draws its defined variants only.
    undefined = table.with_columns(
        pl.when(pl.col("Metric") == "CapRec").then(float("nan")).otherwise(pl.col(c)).alias(c)
        for c in ("seed_3", "seed_5", "mean", "min", "max")
    ).with_columns(n_finite=pl.when(pl.col("Metric") == "CapRec").then(0).otherwise(pl.col("n_finite")))
    assert [ax.get_title() for ax in seeds.draw_seeds(undefined).axes] == ["Cap (higher is better)", "KL (lower is better)"]


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
    seeds.stability(Job(input={"modules": modules, "masks": masks}, output=out, params=params))
    matches = pl.read_parquet(out["parquet"])
    expected = pl.concat([seeds.mask_stability(MASKS, DECODERS, "CapMask"),
                          seeds.mask_stability({0: {0: [3]}, 1: {}}, DECODERS, "VMask")])
    assert matches.equals(expected)
    summary = pl.read_csv(out["csv"])
    assert summary.select("mask", "seed", "other_seed", "mask_size", "other_mask_size").rows() == [
        ("CapMask", 0, 1, 3, 3), ("CapMask", 1, 0, 3, 3), ("VMask", 0, 1, 1, 0), ("VMask", 1, 0, 0, 1)]
    # VMask's e3 of seed 0 is row 3 of seed 1's layer-0 dictionary.
    assert summary.row(2, named=True)["in_dictionary_matched"] == 1
    with pytest.raises(ValueError, match="surrogate of layer 1 seed 0, expected layer 0 seed 0"):
        seeds.stability(Job(input={"modules": [modules[1], modules[0], *modules[2:]], "masks": masks},
                            output=out, params=params))
