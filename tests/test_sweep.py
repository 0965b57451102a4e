"""Sweep expansion: keys from the flags' table, typed values, safe unique task names, array chunks."""

import time

import pytest

from launcher.cmd_run import RUN_FLAGS
from launcher.plan import make_plan
from launcher.profiles import load_profile
from launcher.rundir import check_name
from launcher.sweep import MAX_TASKS, chunks, expand_sweep, is_complete, sweep_keys
from launcher.table import load_table
from telepathy.config import RunConfig
from telepathy.errors import UserError
from telepathy.registry import load_registry


def test_product_order_names_and_overrides():
    tasks = expand_sweep(["seed=1,2,3", "lr=1e-4,2e-4"])
    assert len(tasks) == 6
    names = [n for n, _ in tasks]
    assert names[:2] == ["000-seed=1-lr=0.0001", "001-seed=1-lr=0.0002"] and names[5].startswith("005-seed=3")
    assert tasks[1][1] == {"train": {"seed": 1, "lr": 2e-4}}
    assert len(set(names)) == 6 and all(check_name(n) for n in names)


def test_every_flag_key_maps_to_its_runconfig_field_and_applies():
    base = RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir="/tmp/r")
    (_, o), = expand_sweep(["soft_tokens=8", "depth=3", "task=demo", "steps=7", "diversity-weight=0.5"])
    assert o == {"bridge": {"soft_tokens": 8, "depth": 3, "diversity_weight": 0.5}, "data": {"task": "demo"},
                 "train": {"steps": 7}}
    cfg = base.replace(**o)
    assert (cfg.bridge.soft_tokens, cfg.bridge.depth, cfg.data.task, cfg.train.steps) == (8, 3, "demo", 7)
    assert set(sweep_keys()) == set(RUN_FLAGS) | {"pair"}  # one table: the flags'


def test_pair_sweep_passes_the_pair_through():
    tasks = expand_sweep(["pair=tiny-llama-tiny-qwen,tiny-mistral-tiny-qwen", "seed=1"])
    assert [o["pair"] for _, o in tasks] == ["tiny-llama-tiny-qwen", "tiny-mistral-tiny-qwen"]


@pytest.mark.parametrize("spec,fragment", [
    ("seed", "KEY=V1,V2"), ("=1,2", "KEY=V1,V2"), ("colour=red", "unknown"), ("seed=1,,2", "empty value"),
    ("seed=1,1", "repeated"), ("lr=fast", "bad value"), ("steps=0", "bad value"), ("lr=-1", "bad value"),
    ("seed=$(touch /tmp/x)", "bad value"),
])
def test_bad_specs_are_one_line_user_errors(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        expand_sweep([spec])


def test_a_key_twice_and_too_many_tasks_are_refused():
    with pytest.raises(UserError, match="given twice"):
        expand_sweep(["seed=1", "seed=2"])
    big = ",".join(map(str, range(101)))
    with pytest.raises(UserError, match=f"more than {MAX_TASKS}"):
        expand_sweep([f"seed={big}", f"warmup-steps={big}"])


def test_hostile_string_values_give_safe_folder_names(tmp_path):
    odd = tmp_path / "a b'c\"$(touch x);`y`.jsonl"
    odd.write_text('{"text": "hi", "label": "x"}\n')
    (name, overrides), = expand_sweep([f"task={odd}"])
    assert check_name(name) and "/" not in name and "$" not in name and " " not in name
    assert overrides["data"]["task"] == str(odd)  # the value itself is untouched (it goes to config.json)


def test_planning_1000_tasks_takes_under_a_second():
    reg, prof, table = load_registry(), load_profile("dgx-h100", environ={}), load_table()
    pair = reg.pair("llama3b-qwen3b")
    base = RunConfig(sender="llama3b", receiver="qwen3b", run_dir="/tmp/r")

    def plan_sweep():
        tasks = expand_sweep(["seed=" + ",".join(map(str, range(100))), "lr=1e-4,2e-4,3e-4,4e-4,5e-4", "depth=1,2"])
        return [make_plan(pair, base.replace(**o), gpus=8, profile=prof, mode="slurm", table=table) for _, o in tasks]

    timings = []
    for _ in range(3):  # best of 3, as timeit does: other processes share these 2 cores
        t0 = time.perf_counter()
        plans = plan_sweep()
        timings.append(time.perf_counter() - t0)
    assert len(plans) == 1000 and min(timings) < 1.0, f"{min(timings):.2f} s"


def test_chunks_respect_max_array_size():
    assert chunks(3, 1001) == [range(0, 3)]
    assert chunks(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert [len(c) for c in chunks(2500, 1001)] == [1001, 1001, 498]
    with pytest.raises(ValueError):
        chunks(3, 0)


def test_complete_means_the_eval_file_exists(tmp_path):
    assert not is_complete(tmp_path)
    (tmp_path / "eval.json").write_text("{}")
    assert is_complete(tmp_path)
