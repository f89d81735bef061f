import polars as pl
import pytest
import torch
from test_models import save_tiny
from transformers import GenerationConfig

from postdiff.method.evaluate import generate_records
from postdiff.method.records import read_rows
from postdiff.method.teacher import SCHEMA, completions_frame, teacher
from postdiff.models.generation import generate
from postdiff.models.hook import LayerEdit
from postdiff.models.loading import load_model
from postdiff.models.template import encode_prefix
from postdiff.workflow.runtime import Job


def split_frame() -> pl.DataFrame:
    return pl.DataFrame({
        "id": ["qa-0", "math-0", "fmt-0"],
        "slice": ["QA", "Math", "Format"],
        "prompt": ["What is the capital of Vel?", "2+3=?", "Answer in JSON: name Vel."],
        "gold": [["Ost"], ["5"], []],
        "checker": ["{}", "{}", '{"format": "json"}'],
        "split": ["test"] * 3,
    })


def job(tmp_path, model_dir, split_path, **params) -> Job:
    return Job(
        input={"split": str(split_path)},
        output={"completions": str(tmp_path / "teacher" / "test.parquet")},
        params={"pt": str(model_dir), "it": str(model_dir), "dtype": "auto", "device": "cpu", "max_new_tokens": 6,
                "batch_size": 2, **params},
    )


def test_teacher_writes_the_contract(tmp_path):
    model_dir = save_tiny(tmp_path / "it", seed=1)
    split = split_frame()
    split.write_parquet(tmp_path / "test.parquet")
    j = job(tmp_path, model_dir, tmp_path / "test.parquet")
    teacher(j)
    out = pl.read_parquet(j.output["completions"])
    assert dict(out.schema) == SCHEMA
    assert out["id"].to_list() == split["id"].to_list()
    assert out["slice"].to_list() == split["slice"].to_list()
    model, tok = load_model(str(model_dir), device="cpu")
    prefixes = [encode_prefix(tok, p) for p in split["prompt"]]
    assert out["prefix_ids"].to_list() == prefixes
    expected = generate(model, tok, prefixes, 6, batch_size=1)
    assert out["token_ids"].to_list() == [ids for ids, _ in expected]
    assert out["eos"].to_list() == [eos for _, eos in expected]
    assert out["n_tokens"].to_list() == [len(ids) - eos for ids, eos in expected]
    assert out["text"].to_list() == [tok.decode(ids, skip_special_tokens=True) for ids, _ in expected]


def test_completions_frame_counts_tokens_without_eos():
    split = pl.DataFrame({"id": ["a", "b"], "slice": ["QA", "Math"]})
    frame = completions_frame(split, [[2, 5], [2]], [([7, 8, 1], True), ([9, 9], False)], ["x", "yy"])
    assert frame["n_tokens"].to_list() == [2, 2]
    assert frame["eos"].to_list() == [True, False]
    assert frame.row(0, named=True) == {"id": "a", "slice": "QA", "prefix_ids": [2, 5], "token_ids": [7, 8, 1],
                                        "text": "x", "eos": True, "n_tokens": 2}


def test_empty_split_gives_an_empty_typed_file(tmp_path):
    model_dir = save_tiny(tmp_path / "it")
    split_frame().head(0).write_parquet(tmp_path / "empty.parquet")
    j = job(tmp_path, model_dir, tmp_path / "empty.parquet")
    teacher(j)
    out = pl.read_parquet(j.output["completions"])
    assert out.height == 0 and dict(out.schema) == SCHEMA


def test_bad_split_and_params_fail_before_loading(tmp_path):
    split_frame().drop("prompt").write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: missing columns \['prompt'\]"):
        teacher(job(tmp_path, tmp_path / "nowhere", tmp_path / "bad.parquet"))
    split_frame().write_parquet(tmp_path / "ok.parquet")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        teacher(job(tmp_path, tmp_path / "nowhere", tmp_path / "ok.parquet", max_new_tokens=0))


def stop_pair(tmp_path) -> tuple[str, str, int]:
    """A pair whose IT lists ``<end_of_turn>`` as a stop and emits it first, as Gemma 3 IT ends a
    turn; PT's generation config stops on ``<eos>`` alone."""
    pt_dir = save_tiny(tmp_path / "pt", seed=0, extra=("<end_of_turn>",))
    it_dir = save_tiny(tmp_path / "it", seed=1, extra=("<end_of_turn>",))
    it, tok = load_model(str(it_dir), "float32", "cpu")
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    # IT's final hidden states share a mean direction; an <end_of_turn> row along it wins the argmax.
    hidden = torch.cat([it(input_ids=torch.tensor([encode_prefix(tok, p)]), output_hidden_states=True).hidden_states[-1][0]
                        for p in split_frame()["prompt"]])
    with torch.no_grad():
        it.get_input_embeddings().weight[end_of_turn] = 20 * hidden.mean(0) / hidden.mean(0).norm()
    it.generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id, end_of_turn])
    it.save_pretrained(it_dir)
    GenerationConfig(eos_token_id=tok.eos_token_id).save_pretrained(pt_dir)
    return str(pt_dir), str(it_dir), end_of_turn


def test_teacher_and_steered_pt_stop_on_the_same_token_and_count_it_alike(tmp_path):
    pt_dir, it_dir, end_of_turn = stop_pair(tmp_path)
    split_frame().write_parquet(tmp_path / "test.parquet")
    j = job(tmp_path, it_dir, tmp_path / "test.parquet", pt=pt_dir)
    teacher(j)
    taught = pl.read_parquet(j.output["completions"])
    assert all(ids[-1] == end_of_turn for ids in taught["token_ids"]) and taught["eos"].all()
    assert taught["n_tokens"].to_list() == [len(ids) - 1 for ids in taught["token_ids"]]

    paired, tok = load_model(pt_dir, "float32", "cpu", partner=it_dir)
    alone, _ = load_model(pt_dir, "float32", "cpu")
    assert paired.generation_config.eos_token_id == [tok.eos_token_id, end_of_turn]
    assert alone.generation_config.eos_token_id == [tok.eos_token_id]
    # A stand-in for FullDelta: the last block's output pushed along <end_of_turn>'s unembedding row.
    row = paired.get_input_embeddings().weight[end_of_turn]
    edits = {1: LayerEdit(1.0, lambda h: 1e3 * (row / row.norm()).expand_as(h))}
    rows = read_rows(str(tmp_path / "test.parquet"), j.output["completions"])
    steered = generate_records(paired, tok, rows, "FullDelta", 6, 2, edits=edits)
    assert steered["eos"].all() and steered["n_tokens"].to_list() == taught["n_tokens"].to_list() == [0, 0, 0]
    # PT's own stop set would have let the steered model run on past <end_of_turn>.
    unstopped = generate_records(alone, tok, rows, "FullDelta", 6, 2, edits=edits)
    assert not unstopped["eos"].any() and unstopped["n_tokens"].to_list() == [6, 6, 6]
