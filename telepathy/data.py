"""Tasks as data: a task spec (configs/tasks/<name>.yaml), its examples, and the collator that turns
examples into training batches.

`DataConfig.task` is one of
- a name in configs/tasks/ (sst2, agnews, trec, demo): a hub dataset (loaded with `datasets`, lazily) or
  local files (`files:` relative to telepathy/data/);
- a path to a task .yaml (relative `files:` resolve against the yaml's folder);
- a path to a .jsonl or .csv file with fields `text` and `label` (a label word or a class index); label
  words are then the sorted distinct labels. The eval split is a sibling `eval|validation|test` file when
  the file is named `train.*`, else every 10th example (after a fixed shuffle) is held out.
Bad input is a one-line UserError naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import re
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from telepathy.config import DataConfig
from telepathy.errors import UserError
from telepathy.paths import config_file, config_names

_FILE_SUFFIXES = (".jsonl", ".csv")
_SUBSET_SEED = 0  # sample limits pick the same examples in every run (comparable evaluations)


@dataclass(frozen=True)
class Example:
    text: str  # what fills {text} in the sender prompt (cut first when the prompt is too long)
    label: int  # index into TaskSpec.labels
    extra: dict[str, str] = field(default_factory=dict, hash=False)  # other prompt fields: {question} for BoolQ
    # Its position in the split as read (before any sample limit): the id paired tests match examples by.
    id: int = field(default=-1, compare=False)


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task needs beyond its examples: label words, the receiver primer, the sender prompt."""

    name: str
    labels: tuple[str, ...]  # label words; an example's label is an index into this
    primer: str  # the receiver's only text: "[primer][K soft tokens][answer]"
    prompt: str  # the sender's input, with {text} (and {name} for each extra field)
    text_field: str = "text"
    label_field: str = "label"
    extra_fields: dict[str, str] = field(default_factory=dict)  # prompt placeholder -> dataset column
    dataset: str | None = None  # hub dataset id
    revision: str = "main"  # branch, tag or commit: "refs/convert/parquet" for repos that keep a loading script
    hub_files: dict[str, str] = field(default_factory=dict)  # "train"/"eval" -> file pattern in the repo (parquet)
    files: dict[str, str] = field(default_factory=dict)  # "train"/"eval" -> absolute path (local tasks)
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)  # label word -> also accepted words
    max_length: int | None = None  # the task's usual sender length (the original's), for the launcher
    answer_length: int | None = None  # receiver answer tokens its longest label needs (with EOS), if above 16
    # Text relay: what the sender is asked to write ({text}), and what the receiver reads ({summary}); without a
    # reader the receiver reads the task prompt around the summary, so it sees the same question and labels as
    # receiver_zero_shot (the original's reader gave it only the primer, one reason its relay scored below chance).
    relay_prompt: str = "Summarize this in one sentence:\n\n{text}\n\nSummary:"
    relay_reader: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # "train"/"eval" -> examples, for cost estimates

    def relay_text(self, summary: str) -> str:
        """What the receiver reads in the text relay."""
        if self.relay_reader is None:
            return self.sender_text(summary)
        return self.relay_reader.replace("{summary}", summary).replace("{primer}", self.primer)

    def k_shot_text(self, demos: Sequence[Example], example: Example) -> str:
        """receiver_k_shot's prompt: each demonstration's prompt and answer, then the example's prompt."""
        shots = "".join(self.sender_text(d.text, d.extra) + self.answer_text(d.label) + "\n\n" for d in demos)
        return shots + self.sender_text(example.text, example.extra)

    def sender_text(self, text: str, extra: dict[str, str] | None = None) -> str:
        """The prompt around one example (str.replace, not str.format: texts contain braces)."""
        out = self.prompt
        for name, value in (extra or {}).items():
            out = out.replace(f"{{{name}}}", value)
        return out.replace("{text}", text)

    def answer_text(self, label: int) -> str:
        """What the receiver is trained to say (the collator appends the EOS token)."""
        return f" {self.labels[label]}"

    def match(self, generated: str) -> int | None:
        """The label whose word (or synonym) occurs FIRST in the lower-cased generated text, as a whole word
        (not inside a longer word); the longer word wins a tie. None when no label word occurs."""
        text = generated.lower()
        best: tuple[int, int, int] | None = None  # (position, -length, label)
        for i, word in enumerate(self.labels):
            for w in (word, *self.synonyms.get(word, ())):
                m = re.search(rf"(?<![a-z0-9]){re.escape(w.lower())}(?![a-z0-9])", text)
                if m and (best is None or (m.start(), -len(w)) < best[:2]):
                    best = (m.start(), -len(w), i)
        return None if best is None else best[2]


@dataclass(frozen=True)
class Task:
    spec: TaskSpec
    train: list[Example]
    eval: list[Example]


# ---------------------------------------------------------------- specs


def task_names() -> list[str]:
    return config_names("tasks")


def load_spec(task: str) -> TaskSpec:
    """The spec for a task name or a task .yaml path (bare data files get theirs in load_task)."""
    path = Path(task)
    if path.suffix not in (".yaml", ".yml"):
        path = config_file(f"tasks/{task}.yaml")
        if not path.is_file():
            raise UserError(
                f"unknown task '{task}'; use one of {', '.join(task_names())}, "
                "a task .yaml, or a .jsonl/.csv file with fields text,label"
            )
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"task file {path} not found; check the path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML; fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a task spec must be a mapping; see configs/tasks/demo.yaml")
    missing = [k for k in ("labels", "primer", "prompt") if k not in raw]
    if missing or not raw.get("dataset") and not raw.get("files"):
        need = missing or ["dataset or files"]
        raise UserError(f"{path}: missing {', '.join(need)}; see configs/tasks/demo.yaml for the fields")
    for key in ("hub_files", "files"):
        if raw.get("dataset" if key == "hub_files" else "files") and set(raw.get(key) or {}) != {"train", "eval"}:
            got = sorted(raw.get(key) or {})
            raise UserError(f"{path}: {key} needs exactly a 'train' and an 'eval' entry (got {got})")
    if "{text}" not in raw["prompt"]:
        raise UserError(f"{path}: prompt must contain {{text}} (where the example's text goes)")
    if "relay_prompt" in raw and "{text}" not in str(raw["relay_prompt"]):
        raise UserError(f"{path}: relay_prompt must contain {{text}} (what the sender summarises)")
    if raw.get("relay_reader") is not None and "{summary}" not in str(raw["relay_reader"]):
        raise UserError(f"{path}: relay_reader must contain {{summary}} (what the sender wrote)")
    sizes = raw.get("sizes") or {}
    if not isinstance(sizes, dict) or any(
        k not in ("train", "eval") or not isinstance(v, int) for k, v in sizes.items()
    ):
        raise UserError(f"{path}: sizes must map train and eval to example counts, e.g. {{train: 5452, eval: 500}}")
    known = {f.name for f in TaskSpec.__dataclass_fields__.values()} - {"name"}
    unknown = set(raw) - known
    if unknown:
        raise UserError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    if not isinstance(raw["labels"], list) or len(raw["labels"]) < 2:
        raise UserError(f"{path}: labels must be a list of at least 2 label words")
    if any(isinstance(w, bool) for w in raw["labels"]):  # YAML reads yes/no/on/off/true as booleans
        raise UserError(f"{path}: a label parsed as a boolean; quote label words like 'yes' and 'no'")
    raw["labels"] = tuple(str(w) for w in raw["labels"])
    base = path.resolve().parent  # local files are relative to the spec's folder
    raw["files"] = {split: str((base / f).resolve()) for split, f in (raw.get("files") or {}).items()}
    raw["revision"] = str(raw.get("revision", "main"))
    raw["synonyms"] = {k: tuple(v) for k, v in (raw.get("synonyms") or {}).items()}
    return TaskSpec(name=path.stem, **raw)


def _file_spec(path: Path, labels: Sequence[str]) -> TaskSpec:
    words = ", ".join(labels)
    return TaskSpec(
        name=path.stem,
        labels=tuple(labels),
        primer="Label:",
        prompt=f"Text: {{text}}\nLabel ({words}):",
        files={"train": str(path)},
    )


# ---------------------------------------------------------------- examples


def _rows(path: Path, text_field: str, label_field: str) -> Iterable[tuple[int, str, Any]]:
    """(line number, text, raw label) from a JSONL or CSV file."""
    if not path.is_file():
        raise UserError(
            f"data file {path} not found; check the path (or regenerate the demo: python -m telepathy.demo_data)"
        )
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, *_fields(row, path, reader.line_num, text_field, label_field)
        return
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object with '{text_field}' and '{label_field}'")
            yield lineno, *_fields(row, path, lineno, text_field, label_field)


def _fields(row: dict, path: Path, lineno: int, text_field: str, label_field: str) -> tuple[str, Any]:
    for name in (text_field, label_field):
        if row.get(name) in (None, ""):
            raise UserError(
                f"{path}:{lineno}: missing field '{name}'; every example needs '{text_field}' and '{label_field}'"
            )
    return str(row[text_field]), row[label_field]


def _label_index(value: Any, labels: Sequence[str], where: str) -> int:
    """A label word (case-insensitive) or a class index."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        lowered = [w.lower() for w in labels]
        if value.strip().lower() in lowered:
            return lowered.index(value.strip().lower())
    else:
        try:
            index = int(value)
        except (TypeError, ValueError):
            index = -1
        if 0 <= index < len(labels):
            return index
    raise UserError(
        f"{where}: unknown label {value!r}; expected one of {', '.join(labels)} or an index 0..{len(labels) - 1}"
    )


def _read_file(path: Path, spec: TaskSpec) -> list[Example]:
    return [
        Example(text, _label_index(label, spec.labels, f"{path}:{lineno}"))
        for lineno, text, label in _rows(path, spec.text_field, spec.label_field)
    ]


def _read_hub(spec: TaskSpec) -> tuple[list[Example], list[Example]]:
    """Both splits of a hub task from its parquet files in the Hugging Face cache (downloaded first unless
    offline). Columns are checked, and label words against the dataset's own ClassLabel names."""
    from telepathy.hub import dataset_folder, task_need  # noqa: PLC0415  (huggingface_hub only for hub tasks)

    need = task_need(spec)
    root = dataset_folder(need)
    return tuple(_read_parquet(spec, need, s, sorted(root.glob(need.splits[s]))) for s in ("train", "eval"))


def _read_parquet(spec: TaskSpec, need, split: str, files: list[Path]) -> list[Example]:
    import pyarrow.parquet as pq  # noqa: PLC0415  (a dependency of datasets, only for hub tasks)

    where = f"task '{spec.name}', {need.label} split {split}"
    if not files:
        raise UserError(
            f"{where}: no file matches {need.splits[split]!r}; fix hub_files in the task spec or "
            f"run `launch prefetch --task {spec.name}`"
        )
    columns = [spec.text_field, spec.label_field, *spec.extra_fields.values()]
    try:
        schema = pq.read_schema(files[0])
        absent = [c for c in columns if c not in schema.names]
        if absent:
            raise UserError(
                f"{where}: no column {absent[0]!r} (columns: {', '.join(schema.names)}); fix text_field, "
                "label_field or extra_fields in the task spec"
            )
        table = pq.read_table(files, columns=columns)
    except (OSError, ValueError) as e:  # pyarrow's errors for a damaged or non-parquet file
        raise UserError(
            f"{where}: cannot read {files[0].name} ({str(e).splitlines()[0][:120]}); fetch it again "
            f"with `launch prefetch --task {spec.name}`"
        ) from None
    _check_class_names(spec, schema, where)
    data = table.to_pydict()
    extras = {name: data[column] for name, column in spec.extra_fields.items()}
    return [
        Example(
            str(text),
            _label_index(label, spec.labels, f"{where} row {i}"),
            {name: str(values[i]) for name, values in extras.items()},
        )
        for i, (text, label) in enumerate(zip(data[spec.text_field], data[spec.label_field]))
    ]


def _check_class_names(spec: TaskSpec, schema, where: str) -> None:
    """When the parquet carries the dataset's features and the label is a ClassLabel: as many classes as label
    words, and no label word that is another class's name (the original listed TREC's DESC and ENTY in the wrong
    order and trained every such question on the other's answer). Words may differ from names ("science" for
    "Sci/Tech")."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return
    feature = json.loads(meta).get("info", {}).get("features", {}).get(spec.label_field, {})
    names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    if not names:
        return
    if len(names) != len(spec.labels):
        raise UserError(
            f"{where}: the dataset has {len(names)} classes but the spec lists {len(spec.labels)} labels; "
            "list one label word per class, in the dataset's order"
        )
    lowered = [n.lower() for n in names]
    for i, word in enumerate(spec.labels):
        j = lowered.index(word.lower()) if word.lower() in lowered else i
        if j != i:
            raise UserError(
                f"{where}: label {i} of the spec is {word!r}, which is the dataset's class {j}; list the "
                f"labels in the dataset's order ({', '.join(names)})"
            )


def _subset(examples: list[Example], n: int | None) -> list[Example]:
    """n examples picked by a fixed shuffle (a sorted split's first n would be one class), the same for every
    run and seed, each with its position in the split as its id (what paired tests match)."""
    if n is None or n >= len(examples):
        picked = range(len(examples))
    else:
        picked = sorted(random.Random(_SUBSET_SEED).sample(range(len(examples)), n))
    return [dataclasses.replace(examples[i], id=i) for i in picked]


def split_size(spec: TaskSpec, split: str) -> int | None:
    """Examples in a split without reading a hub dataset: the spec's `sizes`, or the lines of a local file."""
    if split in spec.sizes:
        return spec.sizes[split]
    path = spec.files.get(split)
    if path and Path(path).is_file():
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip()) - (Path(path).suffix == ".csv")
    return None


def k_shot_demos(train: Sequence[Example], n_labels: int, k: int, seed: int) -> list[Example]:
    """k labelled training examples for receiver_k_shot, balanced over the classes (round-robin over the
    classes in a seeded order, a seeded pick within each), in a seeded order: the seed is the only choice."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, e in enumerate(train):
        by_class.setdefault(e.label, []).append(i)
    classes = [c for c in range(n_labels) if c in by_class]
    rng.shuffle(classes)
    pools = {c: rng.sample(by_class[c], len(by_class[c])) for c in classes}
    picked: list[int] = []
    while len(picked) < k and any(pools.values()):
        for c in classes:
            if pools[c] and len(picked) < k:
                picked.append(pools[c].pop())
    rng.shuffle(picked)
    return [train[i] for i in picked]


def _sibling_eval(path: Path) -> Path | None:
    if path.stem != "train":
        return None
    for name in ("eval", "validation", "test"):
        sibling = path.with_name(name + path.suffix)
        if sibling.is_file():
            return sibling
    return None


def _load_file_task(path: Path) -> tuple[TaskSpec, list[Example], list[Example]]:
    eval_path = _sibling_eval(path)
    rows = list(_rows(path, "text", "label"))
    eval_rows = list(_rows(eval_path, "text", "label")) if eval_path else []
    words = sorted(
        {str(label) for _, _, label in rows + eval_rows},
        key=lambda w: (0, int(w)) if w.lstrip("-").isdigit() else (1, w),
    )
    if len(words) < 2:
        raise UserError(f"{path}: found {len(words)} distinct label(s); a task needs at least 2")
    spec = _file_spec(path, words)

    def examples(rows_: list) -> list[Example]:
        return [Example(text, words.index(str(label))) for _, text, label in rows_]

    train = examples(rows)
    if eval_path:
        return spec, train, examples(eval_rows)
    order = list(range(len(train)))
    random.Random(_SUBSET_SEED).shuffle(order)
    held = set(order[::10])
    return spec, [e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held]


def load_task(data_cfg: DataConfig) -> Task:
    """The task's spec and its train/eval examples (limited to train_samples / eval_samples)."""
    path = Path(data_cfg.task)
    if path.suffix in _FILE_SUFFIXES:
        spec, train, evaluation = _load_file_task(path)
    else:
        spec = load_spec(data_cfg.task)
        if spec.files:
            missing = [s for s in ("train", "eval") if s not in spec.files]
            if missing:
                raise UserError(f"task '{spec.name}': files needs a path for {', '.join(missing)}")
            train, evaluation = (_read_file(Path(spec.files[s]), spec) for s in ("train", "eval"))
        else:
            train, evaluation = _read_hub(spec)
    if not train or not evaluation:
        raise UserError(f"task '{spec.name}' has an empty {'train' if not train else 'eval'} split; add examples")
    return Task(spec, _subset(train, data_cfg.train_samples), _subset(evaluation, data_cfg.eval_samples))


# ---------------------------------------------------------------- batches


class PromptTokenizer:
    """Token ids of a prompt template around each text (one batched tokenizer call), with the tokenizer's own
    special tokens (BOS for Llama/Mistral), cut to max_length by cutting the TEXT: what follows it in the
    template (the question, the label list) always survives."""

    def __init__(self, tok, max_length: int):
        self.tok, self.max_length = tok, max_length
        self._tails: dict[str, list[int]] = {}  # token ids of what follows the text, per distinct tail

    def tail(self, tail: str) -> list[int]:
        if tail not in self._tails:
            self._tails[tail] = self.tok(tail, add_special_tokens=False).input_ids
        return self._tails[tail]

    def rows(
        self, template: Callable[[str, dict[str, str]], str], texts: Sequence[str], extras: Sequence[dict] | None = None
    ) -> list[list[int]]:
        """`template(text, extra)` -> the prompt string; its token ids per text, at most max_length."""
        extras = extras or [{}] * len(texts)
        rows = self.tok([template(t, x) for t, x in zip(texts, extras)]).input_ids
        out = []
        for ids, text, extra in zip(rows, texts, extras):
            if len(ids) > self.max_length:
                head, _, tail = template("\0", extra).partition("\0")
                tail_ids = self.tail(tail)
                ids = self.tok(head + text).input_ids[: max(0, self.max_length - len(tail_ids))] + tail_ids
                ids = ids[-self.max_length :] if len(ids) > self.max_length else ids
            out.append(ids)
        return out


class Collator:
    """Examples -> Batch, padded to the longest example in the batch (never to max_length).

    Sender input (`reads="sender"`: the bridge): the task prompt around the text, cut to max_length tokens by
    cutting the TEXT so the prompt's question survives (PromptTokenizer). Receiver: the primer (with the
    receiver tokenizer's special tokens, i.e. BOS where it has one) and the answer " {label}" + EOS,
    right-padded. `reads="receiver"` (prompt tuning, LoRA: no sender): the receiver reads the task prompt
    around the text instead of the primer, left-padded so every row's answer starts at the same position.
    """

    def __init__(
        self, spec: TaskSpec, sender_tok, receiver_tok, max_length: int, answer_length: int, reads: str = "sender"
    ):
        self.spec, self.sender_tok, self.receiver_tok, self.max_length = spec, sender_tok, receiver_tok, max_length
        self.reads = reads
        self.primer_ids = receiver_tok(spec.primer).input_ids
        self.answers = [
            receiver_tok(spec.answer_text(i), add_special_tokens=False).input_ids + [receiver_tok.eos_token_id]
            for i in range(len(spec.labels))
        ]
        longest = max(self.answers, key=len)
        if len(longest) > answer_length:
            raise UserError(
                f"label '{spec.labels[self.answers.index(longest)]}' needs {len(longest)} answer tokens "
                f"(with EOS) but answer_length is {answer_length}; raise data.answer_length"
            )
        self.sender = PromptTokenizer(sender_tok, max_length)
        self.receiver = PromptTokenizer(receiver_tok, max_length)
        _, _, tail = spec.prompt.partition("{text}")
        for side in (self.sender, self.receiver) if reads == "receiver" else (self.sender,):
            if len(side.tail(tail)) >= max_length:
                n = len(side.tail(tail))
                raise UserError(f"the prompt after {{text}} alone is {n} tokens; raise max_length above it")

    def label_ids(self, tok) -> list[list[int]]:
        """Each label word's tokens as the answer starts (" {label}", no EOS): what label scoring scores."""
        return [tok(self.spec.answer_text(i), add_special_tokens=False).input_ids for i in range(len(self.spec.labels))]

    def sender_ids(self, text: str) -> list[int]:
        return self.sender_batch([text])[0]

    def sender_batch(self, texts: Sequence[str], extras: Sequence[dict[str, str]] | None = None) -> list[list[int]]:
        """Sender token ids of the task prompt per text (PromptTokenizer.rows)."""
        return self.sender.rows(self.spec.sender_text, texts, extras)

    def sender_examples(self, examples: Sequence[Example]) -> list[list[int]]:
        return self.sender_batch([e.text for e in examples], [e.extra for e in examples])

    def receiver_examples(self, examples: Sequence[Example]) -> list[list[int]]:
        """Receiver token ids of the task prompt per example (receiver_zero_shot, prompt tuning, LoRA)."""
        return self.receiver.rows(self.spec.sender_text, [e.text for e in examples], [e.extra for e in examples])

    def rows(self, examples: Sequence[Example]) -> list[list[int]]:
        """What the trained part reads, per example: sender ids, or receiver ids (reads="receiver")."""
        return self.receiver_examples(examples) if self.reads == "receiver" else self.sender_examples(examples)

    def tokenize(self, examples: Sequence[Example], chunk: int = 8192) -> TokenRows:
        """Every example's rows, compactly (a split is tokenised once per run: the sampler's lengths, the
        sender cache's key and every batch come from these rows)."""
        return TokenRows(row for i in range(0, len(examples), chunk) for row in self.rows(examples[i : i + chunk]))

    def batch(self, rows: Sequence[Sequence[int]], labels: Sequence[int]):
        """A Batch from rows (`rows` or `tokenize`) and label indices."""
        import torch  # noqa: PLC0415  (the launcher imports this module: torch only for batches)

        from telepathy.step import Batch  # noqa: PLC0415  (step imports torch)

        answer_ids, answer_mask = _pad([self.answers[label] for label in labels], self.receiver_tok.pad_token_id)
        if self.reads == "receiver":
            primer, primer_mask = _pad(rows, self.receiver_tok.pad_token_id, left=True)
            return Batch(
                sender_ids=None,
                sender_mask=None,
                primer_ids=primer,
                answer_ids=answer_ids,
                answer_mask=answer_mask,
                primer_mask=primer_mask,
                labels=torch.tensor(list(labels), dtype=torch.long),
            )
        sender_ids, sender_mask = _pad(rows, self.sender_tok.pad_token_id)
        primer = torch.tensor(self.primer_ids, dtype=torch.long).expand(len(labels), -1).contiguous()
        return Batch(
            sender_ids=sender_ids,
            sender_mask=sender_mask,
            primer_ids=primer,
            answer_ids=answer_ids,
            answer_mask=answer_mask,
            labels=torch.tensor(list(labels), dtype=torch.long),
        )

    def __call__(self, examples: Sequence[Example]):
        return self.batch(self.rows(examples), [e.label for e in examples])


class TokenRows(Sequence):
    """Token-id rows stored flat (int32 + offsets): 4 bytes per token, where lists of Python ints take ~36
    (a 120k-example split at ~60 tokens: 29 MB instead of ~250 MB per rank). Rows are numpy int32 views."""

    def __init__(self, rows: Iterable[Sequence[int]]):
        import numpy as np  # here: the launcher imports this module and stays light  # noqa: PLC0415  (numpy only for token rows)

        flat, offsets = array("i"), [0]
        for row in rows:
            flat.extend(row)
            offsets.append(len(flat))
        self.flat = np.frombuffer(flat, dtype=np.int32) if flat else np.zeros(0, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False):
    """(ids, mask) padded to the longest row: on the right, or on the left (the rows' ends aligned)."""
    import torch  # noqa: PLC0415  (the launcher imports this module: torch only for batches)

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, span] = torch.as_tensor(r, dtype=torch.long)
            mask[i, span] = 1
    return ids, mask
