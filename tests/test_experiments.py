"""python -m opd_train.experiments: the world, and the seconds-long version of every experiment
(the files written and their wiring; the phenomena themselves take the full runs)."""
import json

import pytest

from opd_train.experiments import __main__ as experiments
from opd_train.experiments.specs import EXPERIMENTS
from opd_train.experiments.world import RECIPES, TEMPLATES, World, WorldSpec
from opd_train.task import check_reference


def test_world_vocabulary_solutions_and_checker():
    world = World(experiments.QUICK_WORLD)
    assert len(world.tokenizer) >= 512
    sets = world.question_sets()
    held_out = set(q.names for q in sets["eval"]) | set(q.names for q in sets["benchmark"])
    trained = set(q.names for q in sets["sft"]) | set(q.names for q in sets["opd"])
    assert not held_out & trained
    assert {n for q in sets["benchmark"] for n in q.names} <= set(world.known)
    for q in sets["eval"]:
        total = sum(world.digit[n] for n in q.names) % 10
        assert q.answer == str(total)
        for pattern in ("forward", "backward"):
            text = world.solution(q, pattern)
            ids = world.tokenizer(text, add_special_tokens=False)["input_ids"]
            assert world.tokenizer.unk_token_id not in ids
            assert world.tokenizer.decode(ids) == text  # responses round-trip through the tokenizer
            assert check_reference(text, q.answer)
            assert not check_reference(text, str((total + 1) % 10))
            assert len(ids) + 1 <= world.max_new_tokens()
    for template in TEMPLATES.values():
        prompt = template.format(prompt=world.prompt(sets["eval"][0]))
        assert world.tokenizer.unk_token_id not in world.tokenizer(prompt)["input_ids"]


def _stated_digits(responses: list) -> list:
    """(name, digit) of every lookup "name is d" of forward-pattern responses."""
    words = [r.split() for r in responses]
    return [(w[i - 1], int(w[i + 1])) for w in words for i in range(1, len(w) - 1)
            if w[i] == "is" and not w[i - 1].isdigit()]


def test_sft_data_teaches_what_the_recipe_says():
    world = World(WorldSpec(sft_questions=400))
    known = set(world.known)
    student = _stated_digits(world.sft_data("student", RECIPES["student"])[1])
    teacher = _stated_digits(world.sft_data("teacher", RECIPES["teacher"])[1])
    assert all(world.digit[n] == d for n, d in teacher)
    assert all(world.digit[n] == d for n, d in student if n in known)
    unknown = [world.digit[n] == d for n, d in student if n not in known]
    assert len(unknown) > 100 and sum(unknown) / len(unknown) < 0.3  # random digits: right 1 in 10
    prompts = world.sft_data("student", RECIPES["student"])[0]
    assert {p.split()[0] for p in prompts} == {t.split()[0] for t in TEMPLATES.values()}


def test_world_rejects_bad_spec():
    with pytest.raises(ValueError, match="known_fraction"):
        World(WorldSpec(known_fraction=1.0))


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory, one_torch_thread):
    """Every experiment's seconds-long version, sharing one model cache."""
    root = tmp_path_factory.mktemp("experiments")
    outputs = {}
    for name in EXPERIMENTS:
        assert experiments.main([name, "--quick", "--out", str(root / name), "--cache-dir", str(root / "cache")]) == 0
        outputs[name] = root / name
    return outputs


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_experiment_writes_figure_table_and_json(quick_runs, name):
    folder = quick_runs[name]
    experiment = EXPERIMENTS[name]
    result = json.loads((folder / f"{name}.json").read_text())
    assert result["experiment"] == name and result["quick"] is True
    assert isinstance(result["reproduced"], bool)
    assert list(result["arms"]) == [arm.label for arm in experiment.arms]
    for i, (label, record) in enumerate(result["arms"].items()):
        arm = experiment.arms[i]
        assert record["arm"]["teacher"] == arm.teacher and record["arm"]["objective"] == arm.objective
        assert record["run_dir"] == str(folder / f"arm-{i}" / "run")
        # the held-out diagnostics at step 0 and after every step of the two
        assert [row["step"] for row in record["heldout"]] == [0, 1, 2]
        assert len(record["rollout_accuracy"]) == 2
        for key in ("student_before", "student_after", "teacher"):
            assert 0.0 <= record[key] <= 1.0
        assert ("student_cold_start" in record) == arm.cold_start
        assert ("benchmark" in record) == arm.benchmark
        if arm.entropy_by_position:
            assert [int(s) for s in record["entropy_by_position"]] == [0, 1, 2]  # start, then every checkpoint
            assert all(len(parts) == 4 and all(e >= 0 for e in parts)
                       for parts in record["entropy_by_position"].values())
    table = (folder / f"{name}.md").read_text()
    assert all(f"| {arm.label} |" in table for arm in experiment.arms)
    assert f"**Reproduced: {'yes' if result['reproduced'] else 'no'}.**" in table
    assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_arms_use_what_they_name(quick_runs):
    """The arms differ where their experiment says: the teacher's run config and the prompt wording."""
    configs = {}
    for name in ("patterns", "prompt-template", "support"):
        for i, arm in enumerate(EXPERIMENTS[name].arms):
            configs[name, arm.label] = json.loads((quick_runs[name] / f"arm-{i}" / "run" / "config.json").read_text())
    assert "teacher-backward" in configs["patterns", "other pattern"]["teacher"]
    assert "teacher-backward" not in configs["patterns", "same pattern"]["teacher"]
    assert configs["prompt-template", "student's wording"]["prompt_template"] == TEMPLATES["student"]
    assert configs["prompt-template", "teacher's wording"]["prompt_template"] == TEMPLATES["teacher"]
    assert [configs["support", label]["k"] for label in ("top-1", "top-4", "top-16", "top-64")] == [1, 4, 16, 64]
    assert configs["support", "sampled"]["objective"] == "sampled"


def test_out_folder_must_be_new(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert experiments.main(["patterns", "--quick", "--out", str(tmp_path / "taken"),
                             "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "--out" in capsys.readouterr().err


def test_unknown_experiment_is_refused(capsys):
    with pytest.raises(SystemExit):
        experiments.main(["nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_ctrl_c_stops_the_experiment(tmp_path, interrupt_at_generation, one_torch_thread, capsys):
    """A Ctrl-C in an arm's OPD run: the run checkpoints and stops, and so does the experiment
    (no later arm, no results written from a cut-short run)."""
    interrupt_at_generation(1)
    out = tmp_path / "out"
    assert experiments.main(["patterns", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (out / "arm-0" / "run" / "checkpoints").is_dir() and not (out / "arm-1").exists()
    assert not (out / "patterns.json").exists()
