"""Tasks as data: specs, local files, the hub loader on a local folder, bad-data errors, the collator."""

import json
from pathlib import Path

import pytest
import torch

from telepathy.config import DataConfig
from telepathy.data import Collator, Example, load_spec, load_task, task_names
from telepathy.errors import UserError
from telepathy.loading import load_tokenizer
from telepathy.registry import load_registry

REG = load_registry()


@pytest.fixture(scope="module")
def toks():
    return load_tokenizer(REG.get("tiny-llama")), load_tokenizer(REG.get("tiny-qwen"))


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_shipped_specs_parse_and_trec_label_order():
    assert {"sst2", "agnews", "trec", "demo"} <= set(task_names())
    specs = {name: load_spec(name) for name in ("sst2", "agnews", "trec", "demo")}
    assert specs["trec"].labels == ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")
    assert specs["trec"].label_field == "coarse_label"
    assert specs["sst2"].labels == ("negative", "positive") and "validation" in specs["sst2"].hub_files["eval"]
    assert specs["agnews"].max_length == 256
    for spec in specs.values():
        assert spec.sender_text("X {y}") != spec.prompt and "X {y}" in spec.sender_text("X {y}")
    assert Path(specs["demo"].files["train"]).is_file()


def test_demo_task_loads_balanced():
    task = load_task(DataConfig(task="demo", eval_samples=None))
    assert (len(task.train), len(task.eval)) == (2000, 200)
    counts = [sum(e.label == i for e in task.eval) for i in range(4)]
    assert counts == [50, 50, 50, 50]
    limited = load_task(DataConfig(task="demo", eval_samples=40, train_samples=100))
    assert (len(limited.train), len(limited.eval)) == (100, 40)
    assert limited.eval == load_task(DataConfig(task="demo", eval_samples=40)).eval  # same subset every run
    assert set(limited.eval) <= set(task.eval)


def test_demo_files_are_what_the_generator_writes(tmp_path):
    from telepathy import demo_data
    from telepathy.paths import configs_dir

    demo_data.write(tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (configs_dir() / "tasks" / "demo" / name).read_bytes()


def test_label_match():
    spec = load_spec("agnews")
    assert spec.match(" Sports news") == 1
    assert spec.match("it is about tech and also world") == 3  # synonym, and the first word wins
    assert spec.match("worldwide") is None  # whole words only
    assert spec.match("") is None
    assert load_spec("trec").match(" desc") == 2


def test_jsonl_and_csv_files_with_words_and_indices(tmp_path):
    jsonl = _write(
        tmp_path / "train.jsonl",
        [json.dumps({"text": "a b", "label": "pos"}), json.dumps({"text": "c", "label": "neg"}), ""],
    )
    _write(tmp_path / "eval.jsonl", [json.dumps({"text": "d", "label": "neg"})])
    task = load_task(DataConfig(task=str(jsonl)))
    assert task.spec.labels == ("neg", "pos") and task.train == [Example("a b", 1), Example("c", 0)]
    assert task.eval == [Example("d", 0)] and "{text}" in task.spec.prompt
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(30)))
    task = load_task(DataConfig(task=str(csv_file)))
    assert task.spec.labels == ("0", "1", "2")
    assert (len(task.train), len(task.eval)) == (27, 3)  # every 10th held out (no sibling eval file)
    assert set(task.train).isdisjoint(task.eval)


def test_task_yaml_with_local_files_accepts_words_and_indices(tmp_path):
    _write(tmp_path / "tr.jsonl", [json.dumps({"q": "x", "y": "Yes"}), json.dumps({"q": "z", "y": 0})])
    _write(tmp_path / "ev.jsonl", [json.dumps({"q": "w", "y": "no"})])
    spec = tmp_path / "mine.yaml"
    spec.write_text(
        "files: {train: tr.jsonl, eval: ev.jsonl}\ntext_field: q\nlabel_field: y\n"
        "labels: ['no', 'yes']\nprimer: 'Answer:'\nprompt: 'Q: {text}\\nA:'\n"
    )
    task = load_task(DataConfig(task=str(spec)))
    assert task.spec.name == "mine" and task.train == [Example("x", 1), Example("z", 0)]
    spec.write_text(spec.read_text().replace("['no', 'yes']", "[no, yes]"))
    with pytest.raises(UserError, match="quote label words"):
        load_task(DataConfig(task=str(spec)))


def test_a_hub_task_spec_names_both_splits(tmp_path):
    spec = tmp_path / "hubby.yaml"
    spec.write_text(
        "dataset: org/name\nhub_files: {train: 'a/*.parquet'}\nlabels: [negative, positive]\n"
        "primer: 'Sentiment:'\nprompt: 'Review: {text}\\nSentiment:'\n"
    )
    with pytest.raises(UserError, match=r"hubby.yaml: hub_files needs exactly a 'train' and an 'eval' entry"):
        load_spec(str(spec))


@pytest.mark.parametrize(
    "lines,match",
    [
        (['{"text": "a", "label": "pos"}', '{"text": "b", "label": '], r"train\.jsonl:2: not valid JSON"),
        (['{"text": "a", "label": "pos"}', '{"label": "neg"}'], r"train\.jsonl:2: missing field 'text'"),
        (["[1, 2]"], r"train\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, match):
    path = _write(tmp_path / "train.jsonl", lines)
    with pytest.raises(UserError, match=match):
        load_task(DataConfig(task=str(path)))


def test_unknown_label_names_file_and_line(tmp_path):
    _write(
        tmp_path / "tr.jsonl", [json.dumps({"text": "a", "label": "yes"}), json.dumps({"text": "b", "label": "maybe"})]
    )
    _write(tmp_path / "ev.jsonl", [json.dumps({"text": "c", "label": 5})])
    spec = tmp_path / "t.yaml"
    spec.write_text("files: {train: tr.jsonl, eval: ev.jsonl}\nlabels: ['no', 'yes']\nprimer: 'A:'\nprompt: '{text}'\n")
    with pytest.raises(UserError, match=r"tr\.jsonl:2: unknown label 'maybe'; expected one of no, yes"):
        load_task(DataConfig(task=str(spec)))
    _write(tmp_path / "tr.jsonl", [json.dumps({"text": "a", "label": "yes"})])
    with pytest.raises(UserError, match=r"ev\.jsonl:1: unknown label 5"):
        load_task(DataConfig(task=str(spec)))


@pytest.mark.parametrize(
    "task,match",
    [
        ("nosuchtask", "unknown task 'nosuchtask'; use one of .*demo"),
        ("/nonexistent/dir/train.jsonl", "data file /nonexistent/dir/train.jsonl not found"),
        ("/nonexistent/spec.yaml", "task file /nonexistent/spec.yaml not found"),
    ],
)
def test_missing_things_are_one_line_errors(task, match):
    with pytest.raises(UserError, match=match) as err:
        load_task(DataConfig(task=task))
    assert "\n" not in str(err.value)


def test_spec_field_errors(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("files: {train: a.jsonl, eval: b.jsonl}\nlabels: [a, b]\nprimer: 'A:'\nprompt: 'no slot'\n")
    with pytest.raises(UserError, match="prompt must contain"):
        load_spec(str(spec))
    spec.write_text(
        "files: {train: a.jsonl, eval: b.jsonl}\nlabels: [a, b]\nprimer: 'A:'\nprompt: '{text}'\ncolour: red\n"
    )
    with pytest.raises(UserError, match="unknown field"):
        load_spec(str(spec))


def test_collator_pads_per_batch_and_builds_answers(toks):
    stok, rtok = toks
    spec = load_spec("demo")
    collate = Collator(spec, stok, rtok, max_length=64, answer_length=16)
    short, long = Example("a cat", 0), Example("the dog and the fox ran past the old house again", 0)
    batch = collate([short, Example("snow", 2)])
    widths = [len(r) for r in collate.sender_batch(["a cat", "snow"])]
    assert batch.sender_ids.shape[1] == max(widths) < 64  # the batch's longest, not max_length
    assert batch.sender_mask.sum(1).tolist() == widths
    assert batch.sender_ids[0, 0] == stok.bos_token_id
    assert batch.sender_ids[1, widths[1] :].eq(stok.pad_token_id).all()
    assert stok.decode(batch.sender_ids[0, : widths[0]], skip_special_tokens=True) == spec.sender_text("a cat")
    assert batch.labels.tolist() == [0, 2]
    assert rtok.decode(batch.primer_ids[1]) == spec.primer
    for row, label in enumerate((0, 2)):
        n = int(batch.answer_mask[row].sum())
        assert batch.answer_ids[row, n - 1] == rtok.eos_token_id
        assert rtok.decode(batch.answer_ids[row, : n - 1]) == f" {spec.labels[label]}"
    wider = collate([short, long])
    assert wider.sender_ids.shape[1] > batch.sender_ids.shape[1]


def test_a_split_tokenised_once_gives_the_same_batches(toks):
    stok, rtok = toks
    spec = load_spec("demo")
    collate = Collator(spec, stok, rtok, max_length=24, answer_length=16)
    examples = [Example("a cat", 0), Example("word " * 200, 1), Example("snow", 2), Example("", 3)]
    rows = collate.tokenize(examples, chunk=3)  # two tokenizer calls
    assert len(rows) == 4 and rows.lengths() == [len(r) for r in collate.sender_batch([e.text for e in examples])]
    assert rows.flat.dtype.itemsize == 4 and rows[-1].tolist() == rows[3].tolist()
    with pytest.raises(IndexError):
        rows[4]
    pick = [2, 0, 1]
    a = collate.batch([rows[i] for i in pick], [examples[i].label for i in pick])
    b = collate([examples[i] for i in pick])
    for name in ("sender_ids", "sender_mask", "primer_ids", "answer_ids", "answer_mask", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_truncation_cuts_the_text_and_keeps_the_question(toks):
    stok, rtok = toks
    spec = load_spec("demo")
    collate = Collator(spec, stok, rtok, max_length=24, answer_length=16)
    ids = collate.sender_ids("word " * 200)
    assert len(ids) == 24
    assert stok.decode(ids).endswith("Topic (animal, food, weather, or sport):")
    assert collate.tokenize([Example("word " * 200, 0)]).lengths() == [24]


def test_answer_length_too_short_is_a_user_error(toks):
    with pytest.raises(UserError, match="answer_length"):
        Collator(load_spec("trec"), *toks, max_length=64, answer_length=1)
