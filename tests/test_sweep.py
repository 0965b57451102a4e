"""Sweep expansion: keys from the flags' table, typed values, safe unique task names, array chunks."""

import pytest

from launcher.flags import RUN_FLAGS
from launcher.runs import check_name
from launcher.submit import chunks
from launcher.sweep import MAX_TASKS, expand_sweep, sweep_keys
from telepathy.config import RunConfig
from telepathy.errors import UserError
from telepathy.rundir import RunDir


def test_product_order_names_and_overrides():
    tasks = expand_sweep(["seed=1,2,3", "lr=1e-4,2e-4"])
    assert len(tasks) == 6
    names = [n for n, _ in tasks]
    assert names[:2] == ["000-seed=1-lr=0.0001", "001-seed=1-lr=0.0002"] and names[5].startswith("005-seed=3")
    assert tasks[1][1] == {"train": {"seed": 1, "lr": 2e-4}}
    assert len(set(names)) == 6 and all(check_name(n) for n in names)


def test_every_flag_key_maps_to_its_runconfig_field_and_applies():
    base = RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir="/tmp/r")
    ((_, o),) = expand_sweep(["soft_tokens=8", "depth=3", "task=demo", "steps=7", "diversity-weight=0.5"])
    assert o == {
        "bridge": {"soft_tokens": 8, "depth": 3, "diversity_weight": 0.5},
        "data": {"task": "demo"},
        "train": {"steps": 7},
    }
    cfg = base.replace(**o)
    assert (cfg.bridge.soft_tokens, cfg.bridge.depth, cfg.data.task, cfg.train.steps) == (8, 3, "demo", 7)
    assert set(sweep_keys()) == set(RUN_FLAGS) | {"pair"}  # one table: the flags'


def test_pair_sweep_passes_the_pair_through():
    tasks = expand_sweep(["pair=tiny-llama-tiny-qwen,tiny-mistral-tiny-qwen", "seed=1"])
    assert [o["pair"] for _, o in tasks] == ["tiny-llama-tiny-qwen", "tiny-mistral-tiny-qwen"]


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("seed", "KEY=V1,V2"),
        ("=1,2", "KEY=V1,V2"),
        ("colour=red", "unknown"),
        ("seed=1,,2", "empty value"),
        ("seed=1,1", "repeated"),
        ("lr=fast", "bad value"),
        ("steps=0", "bad value"),
        ("lr=-1", "bad value"),
        ("seed=$(touch /tmp/x)", "bad value"),
    ],
)
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
    ((name, overrides),) = expand_sweep([f"task={odd}"])
    assert check_name(name) and "/" not in name and "$" not in name and " " not in name
    assert overrides["data"]["task"] == str(odd)  # the value itself is untouched (it goes to config.json)


def test_a_sweep_plans_every_task_from_one_request(tmp_path):
    from launcher.flags import LaunchRequest
    from launcher.plan import build_plans

    request = LaunchRequest(
        pair="llama3b-qwen3b",
        gpus=8,
        name="sw",
        runs_dir=str(tmp_path),
        sweep=("seed=1,2,3", "pair=llama3b-qwen3b,llama1b-qwen1.5b"),
    )
    plans, sweep_dir = build_plans(request)
    assert sweep_dir == tmp_path / "sw" and len(plans) == 6
    assert [p.run.train.seed for p in plans] == [1, 1, 2, 2, 3, 3]
    assert [p.run.sender for p in plans[:2]] == ["llama3b", "llama1b"]
    assert all(p.run.dir.path.parent == sweep_dir for p in plans)


def test_chunks_respect_max_array_size():
    assert chunks(3, 1001) == [range(0, 3)]
    assert chunks(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert [len(c) for c in chunks(2500, 1001)] == [1001, 1001, 498]
    with pytest.raises(ValueError):
        chunks(3, 0)


def test_complete_means_the_eval_file_exists(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_complete()
    run.eval.write_text("{}")
    assert run.is_complete()
