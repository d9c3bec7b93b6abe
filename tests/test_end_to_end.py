"""The tiny pipeline end to end at micro scale, through its command-line scripts."""

import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from common.evaluation.exclusion import exclusion_key
from common.outputs import read_ranking
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tiny" / "configs" / "tiny.yaml")


def run(*args: str, check: bool = True, fresh: bool = False) -> subprocess.CompletedProcess:
    """``python -m ARGS``: in this process (a new one spends seconds importing torch and diffusers), or in a new one
    with ``fresh`` or under torchrun."""
    if fresh or args[0] == "torch.distributed.run":
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    else:
        proc = in_process(*args)
    if check and proc.returncode:
        raise AssertionError(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc


def in_process(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` run in this process: its output, its exit status, and a traceback on stderr for an
    uncaught exception, as a new process would give them."""
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv, code = [module, *args], 0
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def shared_args(out: Path) -> list[str]:
    """Model, data, queries and preset flags of the micro run."""
    return [
        "--model",
        str(out / "model"),
        "--data",
        str(out / "data"),
        "--queries",
        str(out / "queries"),
        "--config",
        CONFIG,
        "--preset",
        "micro",
    ]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    run("tiny.shapes", "--out", str(out / "data"), "--num-images", "48", "--resolution", "16")
    run(
        "tiny.train",
        "--data",
        str(out / "data"),
        "--out",
        str(out / "model"),
        "--config",
        CONFIG,
        "--preset",
        "micro",
        "--device",
        "cpu",
    )
    run(
        "common.driver",
        "tiny",
        "generate",
        "--model",
        str(out / "model"),
        "--out",
        str(out / "queries"),
        "--num",
        "2",
        "--num-steps",
        "20",
    )
    attribute = (
        "common.driver",
        "tiny",
        "attribute",
        *shared_args(out),
        "--out",
        str(out / "attr"),
        "--device",
        "cpu",
        "--top-k",
        "10",
    )
    run(*attribute, fresh=True)  # one run of the command line as users start it
    return out, attribute


def test_micro_run_writes_valid_outputs(micro_run):
    out, _ = micro_run
    model_info = json.loads((out / "model" / "model.json").read_text())
    assert model_info["recipe"]["train"]["steps"] == 10 and (out / "model" / "model.safetensors").exists()
    assert not (out / "model" / "checkpoint.safetensors").exists()
    for qid in ("q000", "q001"):
        assert (out / "queries" / qid / "noise.npy").exists()
        folder = out / "attr" / "unlearning" / qid
        ranking = read_ranking(folder / "ranking.json")
        scores = np.load(folder / "scores.npy")
        assert scores.shape == (48,) and np.isfinite(scores).all()
        assert ranking["num_train"] == 48 and len(ranking["top_k"]) == 10
        assert ranking["top_k"][0]["score"] == pytest.approx(float(scores.max()), rel=1e-6)
        assert Path(ranking["top_k"][0]["image"]).exists()
        assert ranking["stats"]["query_loss_rise"] > 0
        assert json.loads((folder / "config.json").read_text())["settings"]["loss"]["num_timesteps"] == 4
        assert (folder / "top10.png").stat().st_size > 1000


def test_rerun_reuses_and_foreign_config_is_refused(micro_run):
    out, attribute = micro_run
    before = (out / "attr" / "unlearning" / "q000" / "scores.npy").read_bytes()
    again = run(*attribute)
    assert "already attributed" in again.stdout
    bad = run(*attribute, "--unlearn.step_size", "0.5", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in bad.stderr
    assert "different config" in bad.stderr
    assert (out / "attr" / "unlearning" / "q000" / "scores.npy").read_bytes() == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--unlearn.selection", "kv"), "unknown weight selection 'kv'"),
        (("--fisher.selection", "everything"), "unknown weight selection"),
        (("--model", "/nonexistent/model"), "missing model config: /nonexistent/model/model.json"),
        (("--method", "tarck"), "unknown method 'tarck'; choose from "),
        (("--unlearn.selection", "all"), "fisher.selection (cross-attn-kv) must equal unlearn.selection (all)"),
    ],
)
def test_bad_input_is_one_line(micro_run, flags, message, tmp_path):
    out, attribute = micro_run
    args = list(attribute)
    args[args.index("--out") + 1] = str(tmp_path / "other")
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    proc = run(*args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and message in proc.stderr.strip().splitlines()[-1]


def counterfactual_error(args, capsys, stage: str = "leave-k-out") -> str:
    """The last line a tiny stage (leave-k-out) prints when it refuses ``args`` with status 2 (run in process)."""
    from common.driver import command

    main = command("tiny", stage)

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("case", ["k", "noise", "model", "data", "off_target"])
def test_counterfactual_bad_input_is_one_line_before_any_work(micro_run, case, tmp_path, capsys):
    out, _ = micro_run
    args = [*shared_args(out), "--attribution", str(out / "attr"), "--out", str(tmp_path / "cf"), "--device", "cpu"]
    if case == "k":
        args += ["--eval.ks", "4", "49"]
        message = "K = 49 exceeds the training-set size 48"
    elif case == "noise":
        shutil.copytree(out / "queries", tmp_path / "queries")
        (tmp_path / "queries" / "q001" / "noise.npy").unlink()
        args[args.index("--queries") + 1] = str(tmp_path / "queries")
        message = "query q001 has no saved noise"
    elif case == "off_target":
        args += ["--eval.off_target", "2"]
        message = "off_target 2 exceeds the number of other queries (1)"
    elif case == "model":
        args[args.index("--model") + 1] = str(tmp_path / "nothing")
        message = "missing model config"
    else:
        run("tiny.shapes", "--out", str(tmp_path / "data"), "--num-images", "48", "--resolution", "16", "--seed", "1")
        args[args.index("--data") + 1] = str(tmp_path / "data")
        message = "was trained on another dataset"
    assert message in counterfactual_error(args, capsys)
    assert not (tmp_path / "cf" / "metrics").exists() and not (tmp_path / "cf" / "models").exists()


def test_counterfactual_folder_refuses_another_exclusion_mode(micro_run, tmp_path):
    out, _ = micro_run
    args = [*shared_args(out), "--out", str(tmp_path / "cf"), "--methods", "random", "--eval.random_seeds", "1"]
    run("common.driver", "tiny", "leave-k-out", *args)
    before = sorted(p.name for p in (tmp_path / "cf").rglob("*.json"))
    proc = run("common.driver", "tiny", "leave-k-out", *args, "--train.exclusion_mode", "remove", check=False)
    assert proc.returncode == 2 and "made under a different config" in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "cf").rglob("*.json")) == before


def test_counterfactual_takes_rankings_made_elsewhere_as_their_own_row(micro_run, tmp_path):
    out, _ = micro_run
    args = [*shared_args(out), "--out", str(tmp_path / "cf"), "--methods", "random", "--eval.random_seeds", "1"]
    args += ["--eval.ks", "4", "--rankings", f"kv={out / 'attr' / 'unlearning'}"]
    run("common.driver", "tiny", "leave-k-out", *args)
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "cf" / "metrics" / "kv").glob("*/*.json"))]
    assert [r["query"] for r in records] == ["q000", "q001"] and all(r["k"] == 4 for r in records)
    for record in records:  # the excluded set is that ranking's top 4
        top = json.loads((out / "attr" / "unlearning" / record["query"] / "ranking.json").read_text())
        assert record["excluded"] == exclusion_key(e["index"] for e in top["top_k"][:4])
    assert "| kv |" in (tmp_path / "cf" / "table.md").read_text()
    # The off-target control asked for afterwards: measured on the models already trained, none trained anew.
    models = sorted(p.name for p in (tmp_path / "cf" / "models").rglob("*") if p.is_dir())
    run("common.driver", "tiny", "leave-k-out", *args, "--eval.off_target", "1")
    assert sorted(p.name for p in (tmp_path / "cf" / "models").rglob("*") if p.is_dir()) == models
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "cf" / "metrics").glob("*/*/*.json"))]
    assert records and all(r["off_target"] == 1 and r["off_target_delta_loss"] != 0.0 for r in records)
    assert "off-target ΔL" in (tmp_path / "cf" / "table.md").read_text()


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("random=ATTR", "--rankings label 'random' is a method's name or another row's"),
        ("../kv=ATTR", "--rankings label '../kv': use letters, digits"),
        ("kv=OTHER", "was made on another model"),
        ("kv", "--rankings takes LABEL=FOLDER, got 'kv'"),
        ("kv=/nonexistent", "--rankings kv: no folder /nonexistent"),
        ("kv=EMPTY", "has no ranking for q000, q001"),
    ],
)
def test_counterfactual_bad_rankings_are_one_line_before_any_work(micro_run, item, message, tmp_path, capsys):
    out, _ = micro_run
    (tmp_path / "empty").mkdir()
    if "OTHER" in item:  # the same queries ranked on another model
        other = tmp_path / "other"
        shutil.copytree(out / "attr" / "unlearning", other)
        for path in other.glob("*/ranking.json"):
            path.write_text(path.read_text().replace(json.loads(path.read_text())["model_fingerprint"], "0" * 16))
        item = item.replace("OTHER", str(other))
    item = item.replace("ATTR", str(out / "attr" / "unlearning")).replace("EMPTY", str(tmp_path / "empty"))
    args = [*shared_args(out), "--out", str(tmp_path / "cf"), "--methods", "random", "--rankings", item]
    assert message in counterfactual_error(args, capsys)
    assert not (tmp_path / "cf" / "metrics").exists() and not (tmp_path / "cf" / "attribution").exists()


@pytest.mark.slow
def test_micro_counterfactual_script_runs_and_resumes(tmp_path):
    env = dict(os.environ, PRESET="micro", NUM_QUERIES="2", NUM_IMAGES="48", SAMPLE_STEPS="20", NOISE_FLOOR_K="4")
    env["NOISE_FLOOR_MODES"] = "remove mask"
    env["VARIANTS"] = "attn_small"  # a Table 2 variant: its settings come from its report
    variant = tmp_path / "cf" / "table2" / "attn_small"
    variant.mkdir(parents=True)
    settings = {
        "unlearn": {"method": "newton", "selection": "attn", "step_size": 1e-4, "steps": 1, "accumulations": 2},
        "fisher": {"selection": "attn", "num_samples": 32, "seed": 0, "file": ""},
        "loss": {"seed": 0, "num_timesteps": 4, "flips": True},
    }
    (variant / "report.json").write_text(json.dumps({"settings": settings}))
    cmd = ["bash", str(ROOT / "tiny" / "scripts" / "counterfactual.sh"), str(tmp_path / "cf")]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "cf" / "leave_k_out"
    metrics = sorted(out.glob("metrics/*/*/*.json"))
    assert len(metrics) == 8  # 2 queries x (unlearning, pixel, random seed 0, attn_small) x K = 4
    config = tmp_path / "cf" / "attribution_attn_small" / "unlearning" / "q000" / "config.json"
    settings = json.loads(config.read_text())["settings"]
    assert settings["unlearn"]["selection"] == "attn" and settings["fisher"]["num_samples"] == 32
    for path in metrics:
        record = json.loads(path.read_text())
        assert record["k"] == 4 and np.isfinite(record["delta_loss"]) and record["mse"] >= 0
        assert record["clip"] is None and "no CLIP weights" in record["clip_note"]
        assert record["off_target"] == 1 and np.isfinite(record["off_target_delta_loss"])  # the other query
    table = (out / "table.md").read_text()
    assert "| unlearning |" in table and "| pixel |" in table and "| random |" in table and "| attn_small |" in table
    models = sorted(p.name for p in out.glob("models/*/*"))
    assert 1 <= len(models) <= 7  # 2 queries x 3 ranked methods + 1 random set shared by both queries
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "[1/" not in second.stdout  # nothing retrained or re-measured
    assert sorted(p.name for p in out.glob("models/*/*")) == models
    for mode in ("remove", "mask"):
        floor = json.loads((tmp_path / "cf" / f"noise_floor_{mode}" / "noise_floor.json").read_text())
        assert floor["exclusion_mode"] == mode and floor["random_delta_loss"][0]["k"] == 4


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "model.safetensors is damaged or incomplete"),
        ("json", "model.json is damaged (not valid JSON)"),
    ],
)
def test_damaged_model_files_are_one_line(micro_run, tmp_path, damage, message):
    out, attribute = micro_run
    shutil.copytree(out / "model", tmp_path / "model")
    if damage == "truncate":  # a partial copy
        weights = tmp_path / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (tmp_path / "model" / "model.json").write_text('{"model": {"resolution": 16,')
    args = list(attribute)
    args[args.index("--model") + 1] = str(tmp_path / "model")
    args[args.index("--out") + 1] = str(tmp_path / "attr")
    proc = run(*args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_other_methods_write_the_same_outputs(micro_run):
    out, attribute = micro_run
    for name in ("pixel", "random"):
        run(*attribute, "--method", name)
        ranking = read_ranking(out / "attr" / name / "q000" / "ranking.json")
        assert ranking["method"] == name and len(ranking["top_k"]) == 10
        assert (out / "attr" / name / "q000" / "top10.png").stat().st_size > 1000


def test_unlearning_check_reproduces_then_compares(micro_run):
    out, _ = micro_run
    run("tiny.unlearning_check", *shared_args(out), "--out", str(out / "attr"))
    report = json.loads((out / "attr" / "unlearning_check.json").read_text())
    assert report["reproduction_mse"] < 1e-10  # the original model regenerates its queries exactly
    assert [r["target"] for r in report["rows"]] == ["q000", "q001"]
    assert all(r["target_mse"] > 0 and np.isfinite(r["others_mse_mean"]) for r in report["rows"])
    assert all(r["target_delta_loss"] > 0 and np.isfinite(r["others_delta_loss_mean"]) for r in report["rows"])


def test_two_processes_train_the_same_model(tmp_path):
    """2 CPU processes (torchrun, gloo) split every batch and give the single-process weights."""
    from safetensors.torch import load_file

    run("tiny.shapes", "--out", str(tmp_path / "data"), "--num-images", "32", "--resolution", "16")
    flags = ["--data", str(tmp_path / "data"), "--config", CONFIG, "--preset", "micro", "--device", "cpu"]
    run("tiny.train", *flags, "--out", str(tmp_path / "one"))
    # `accelerate launch --cpu --num_processes 2` has been seen to start one process: torchrun starts two.
    run("torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), "-m", "tiny.train", *flags,
        "--out", str(tmp_path / "two"))  # fmt: skip
    one, two = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-4, worst
    summaries = [json.loads((tmp_path / d / "model.json").read_text())["summary"] for d in ("one", "two")]
    assert [s["processes"] for s in summaries] == [1, 2]  # the second run really was split
    assert summaries[0]["final_loss"] == pytest.approx(summaries[1]["final_loss"], rel=1e-4)


def evaluate(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("common.driver", "tiny", "evaluate", *args, check=check)


def test_evaluate_takes_explicit_self_picks_and_refuses_one_outside(micro_run, tmp_path):
    out, _ = micro_run
    common = ["--model", str(out / "model"), "--data", str(out / "data"), "--config", CONFIG, "--preset", "micro"]
    common += ["--device", "cpu", "--method", "pixel", "--num-generated", "0", "--out", str(tmp_path / "eval")]
    evaluate(*common, "--self-picks", "3", "7", "--cache", str(tmp_path / "cache"))
    report = json.loads((tmp_path / "eval" / "pixel" / "report.json").read_text())
    assert report["self_picks"] == [3, 7] and report["self_attribution"]["ranks"] == [1, 1]
    assert (tmp_path / "cache").is_dir() and not (tmp_path / "eval" / "pixel" / "cache").exists()
    proc = evaluate(*common, "--self-picks", "48", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --self-picks 48 is outside the training set (N = 48)"


def test_evaluate_reuses_generated_queries_only_under_the_same_settings(micro_run, tmp_path):
    out, _ = micro_run
    common = ["--model", str(out / "model"), "--data", str(out / "data"), "--config", CONFIG, "--preset", "micro"]
    common += ["--device", "cpu", "--method", "pixel", "--self-picks", "3", "--out", str(tmp_path / "eval")]
    evaluate(*common, "--num-generated", "2")
    folder = tmp_path / "eval" / "generated_queries"
    made = {p.name: p.stat().st_mtime_ns for p in folder.glob("*/image.png")}
    evaluate(*common, "--num-generated", "1", "--tag", "again")  # a prefix of the same queries: reused
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*/image.png")} == made
    assert len(list((tmp_path / "eval" / "again" / "generated").iterdir())) == 1
    for flags, reason in [
        (["--eval-seed", "1"], "was made under a different config (prompt_seed differ)"),
        (["--num-generated", "3"], "holds 2 generated queries, fewer than --num-generated 3; choose another --out"),
    ]:
        proc = evaluate(*common, "--num-generated", "2", "--tag", "other", *flags, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert reason in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "eval" / "other").exists()


def test_generate_refuses_query_ids_already_there_unless_overwrite(micro_run, tmp_path, capsys):
    """A second generation with another seed used to replace the first's queries one by one, leaving a mix."""
    from common.driver import command

    out, _ = micro_run
    generate = command("tiny", "generate")
    flags = ["--model", str(out / "model"), "--out", str(tmp_path / "q"), "--num", "2", "--num-steps", "5"]
    generate([*flags, "--device", "cpu"])
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "q").rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        generate([*flags, "--device", "cpu", "--seed", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("already holds query q000 (and 1 more): pass --overwrite to replace them, or choose "
                            "another folder") and len(err) == 1  # fmt: skip
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "q").rglob("*") if p.is_file()} == before
    generate([*flags, "--device", "cpu", "--seed", "1", "--overwrite"])
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "q").rglob("*") if p.is_file()}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in after if k.name == "noise.npy")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["q000", "q001"]  # no staging folder left
    for extra, line in (  # these exited 0 having done nothing, or ended in a traceback
        (["--num", "0"], "--num makes at least 1 query, got 0"),
        (["--num-steps", "0"], "--num-steps = 0 does not fit the model's 1000 diffusion steps"),
        (["--num-steps", "5000"], "--num-steps = 5000 does not fit the model's 1000 diffusion steps"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            generate([*flags, "--device", "cpu", "--out", str(tmp_path / "other"), *extra])
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {line}"]
        assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda x, t: (x[:, :8, :8], t), "its input has shape (3, 8, 8); the model takes (3, 16, 16)"),
        (lambda x, t: ((x * 100).astype(np.int16), t), "its input holds torch.int16, not floats (pixels in [-1, 1])"),
        (lambda x, t: (x * 100, t), "its pixels reach"),
        (lambda x, t: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), t), "NaN or inf in its input"),
        (lambda x, t: (x, t[..., :-1]), "its text condition is 31 wide; the model's is 32"),
    ],
)
def test_a_query_the_model_cannot_take_is_one_line_naming_it_before_any_work(micro_run, tmp_path, capsys, damage,
                                                                             message):  # fmt: skip
    """These used to be attributed silently (or fail deep inside with a RuntimeError)."""
    from common.driver import command

    out, _ = micro_run
    queries = tmp_path / "queries"
    shutil.copytree(out / "queries" / "q000", queries / "q000")
    x, t = damage(np.load(queries / "q000" / "input.npy"), np.load(queries / "q000" / "text_embedding.npy"))
    np.save(queries / "q000" / "input.npy", x)
    np.save(queries / "q000" / "text_embedding.npy", t)
    flags = [*shared_args(out), "--queries", str(queries), "--out", str(tmp_path / "attr"), "--device", "cpu"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        command("tiny", "attribute")([*flags, "--method", "pixel"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: query q000 ({queries / 'q000'}): ") and message in line
    assert not (tmp_path / "attr" / "pixel").exists()


def test_two_query_folders_of_one_id_are_named_as_colliding(micro_run, tmp_path, capsys):
    """A copied query folder used to be refused as "made under a different config"."""
    from common.driver import command

    out, _ = micro_run
    queries = tmp_path / "queries"
    shutil.copytree(out / "queries" / "q000", queries / "q000")
    shutil.copytree(out / "queries" / "q000", queries / "q000 copy")
    flags = [*shared_args(out), "--queries", str(queries), "--out", str(tmp_path / "attr"), "--device", "cpu"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        command("tiny", "attribute")([*flags, "--method", "pixel"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: two queries share the id q000: query q000 ({queries / 'q000'}) and query q000 "
                    f"({queries / 'q000 copy'}) (a copied folder?)")  # fmt: skip


def test_a_training_set_the_model_was_not_trained_on_is_refused_unless_asked(micro_run, tmp_path, capsys):
    """A ranking of images the model never saw used to be written without a word."""
    from common.driver import command

    out, _ = micro_run
    run("tiny.shapes", "--out", str(tmp_path / "other"), "--num-images", "48", "--resolution", "16", "--seed", "1")
    flags = [*shared_args(out), "--data", str(tmp_path / "other"), "--out", str(tmp_path / "attr"), "--device", "cpu"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        command("tiny", "attribute")([*flags, "--method", "pixel"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("was trained on (its model.json records another); pass --other-data to rank it anyway")
    command("tiny", "attribute")([*flags, "--method", "pixel", "--other-data", "--no-plot"])
    assert (tmp_path / "attr" / "pixel" / "q000" / "ranking.json").is_file()


@pytest.mark.slow
def test_fast_path_and_distilled_scripts_run_at_micro_scale_and_resume(tmp_path):
    """tiny/scripts/fast_paths.sh (its sweep, table and leave-K-out step) and distilled.sh, then the sweep again."""
    env = dict(os.environ, PRESET="micro", NUM_IMAGES="48", NUM_QUERIES="2", CHEAP="pixel pixel+text-condition",
               COUNTS="0.25", TIMESTEPS="2", COMBOS="pixel:0.5:2", LEAVE_K_OUT="pixel+text-condition-0.25", LKO_K="4",
               NUM_TRAIN_QUERIES="10", DISTILL_FLAGS="--distill.epochs 2")  # fmt: skip
    out, fp = tmp_path / "fp", tmp_path / "fp" / "fast_paths"

    def script(name: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", f"tiny/scripts/{name}", str(out)], cwd=ROOT, env=env, capture_output=True,
                              text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    script("fast_paths.sh")
    rows = json.loads((fp / "fast_paths.json").read_text())["rows"]
    assert list(rows) == ["exact", "exact, other seeds 1", "exact, other seeds 2", "pixel, top 25%",
                          "pixel+text-condition, top 25%", "2 timesteps", "pixel, top 50%, 2 timesteps"]  # fmt: skip
    exact = rows["exact"]["cost"]["score_forwards"]
    assert exact == 48 * 2 * 4  # images x flips x the micro preset's 4 timesteps
    for name, share in (("pixel, top 25%", 0.25), ("2 timesteps", 0.5), ("pixel, top 50%, 2 timesteps", 0.25)):
        assert rows[name]["cost"]["score_forwards"] == exact * share, name
    assert rows["exact, other seeds 1"]["kind"] == "floor"
    assert all(0 <= q["top10"] <= 1 for q in rows["pixel, top 25%"]["queries"].values())
    table = (fp / "leave_k_out" / "table.md").read_text()
    assert "| exact |" in table and "| pixel-text-condition-0.25 |" in table

    script("distilled.sh")
    latency = (out / "distilled" / "latency.md").read_text()
    assert "| 2,000 | 128 |" in latency and "| 118,287 | 768 |" in latency
    ranking = read_ranking(fp / "distilled" / "q000" / "ranking.json")
    assert ranking["method"] == "distilled" and len(ranking["top_k"]) == 48  # every image (top-k 100 > N)
    again = script("fast_paths.sh")  # every run reused; the distilled method joins the table
    assert "distilled (tiny/scripts/distilled.sh)" in json.loads((fp / "fast_paths.json").read_text())["rows"]
    assert "reusing the trained model" in again.stdout and "trained in" not in again.stdout
    assert "already attributed" in again.stdout and "[1/" not in again.stdout  # no attribution, no retraining


def test_lds_retrains_on_stored_subsets_measures_each_query_and_correlates_every_ranking(micro_run, tmp_path, capsys):
    from common.driver import command
    from common.evaluation import lds
    from common.evaluation.counterfactual import query_loss
    from common.fingerprints import settings_digest
    from common.queries import load_queries
    from tiny.pipeline import load_model

    out, _ = micro_run
    flags = [*shared_args(out), "--attribution", str(out / "attr"), "--out", str(tmp_path / "lds"), "--device", "cpu",
             "--methods", "pixel", "--rankings", f"unl={out / 'attr' / 'unlearning'}", "--lds.count", "3",
             "--lds.bootstrap", "20"]  # fmt: skip
    stage = command("tiny", "lds")
    stage(flags)
    first = capsys.readouterr().out
    assert "[1/3] subset 0 seed +0: 24 images" in first and "| unl |" in first
    masks = np.load(tmp_path / "lds" / "subsets" / "subsets.npy")
    assert masks.shape == (3, 48) and (masks.sum(axis=1) == 24).all()
    table = json.loads((tmp_path / "lds" / "lds.json").read_text())
    assert list(table["rows"]) == ["pixel", "unl"] and table["seeds"] == 1
    recipe = json.loads((tmp_path / "lds" / "config.json").read_text())["recipe"]
    queries = load_queries(str(out / "queries"))
    record = json.loads((tmp_path / "lds" / "outputs" / "s0" / "001.json").read_text())
    excluded = np.flatnonzero(~masks[1]).tolist()
    assert record["excluded"] == exclusion_key(excluded)
    folder = tmp_path / "lds" / "models" / settings_digest({"recipe": recipe, "seed_offset": 0}) / record["excluded"]
    model = load_model(str(folder), "cpu").prepare_for_gradients()  # the subset's model, measured as stored
    for query in queries:
        assert record["losses"][query.id] == pytest.approx(query_loss(model, query, 50, 0), rel=1e-9)

    def stored(seeds: int) -> dict[str, np.ndarray]:  # each query's stored losses: (3 subsets, seeds)
        records = [[json.loads((tmp_path / "lds" / "outputs" / f"s{s}" / f"{j:03d}.json").read_text())["losses"]
                    for s in range(seeds)] for j in range(3)]  # fmt: skip
        return {q.id: np.array([[r[q.id] for r in row] for row in records]) for q in queries}

    losses = stored(1)
    scores = {q.id: np.load(out / "attr" / "unlearning" / q.id / "scores.npy") for q in queries}
    assert table["rows"]["unl"]["queries"] == pytest.approx(lds.lds_per_query(scores, masks, losses), nan_ok=True)
    centred = lds.lds_per_query(scores, masks, losses, centred=True)
    assert table["rows"]["unl"]["centred"]["queries"] == pytest.approx(centred, nan_ok=True)

    stage(flags)  # everything reused
    assert "[1/" not in capsys.readouterr().out
    stage([*flags, "--lds.seeds", "2"])  # a second training seed: 3 more models, each loss the mean of two
    second = capsys.readouterr().out
    assert "[4/6] subset 0 seed +1" in second and "[1/6]" not in second
    two = json.loads((tmp_path / "lds" / "lds.json").read_text())
    assert two["seeds"] == 2 and table["seed_agreement"] is None
    assert two["seed_agreement"]["queries"] == pytest.approx(lds.seed_agreement(stored(2)), nan_ok=True)
    assert len(list((tmp_path / "lds" / "models").glob("*/*"))) == 6
    stage([*flags, "--lds.count", "4"])  # one more subset: only its model trained, the first 3 kept
    grown = capsys.readouterr().out
    assert "[4/4] subset 3 seed +0" in grown and "[1/4]" not in grown
    stage([*flags, "--lds.count", "2"])  # fewer: the first 2, nothing trained
    assert "[1/" not in capsys.readouterr().out
    assert json.loads((tmp_path / "lds" / "lds.json").read_text())["subsets"] == 2
    assert np.load(tmp_path / "lds" / "subsets" / "subsets.npy").shape == (4, len(masks[0]))

    before = (tmp_path / "lds" / "lds.json").read_bytes()
    for extra, line in (
        (["--lds.fraction", "1.5"], "the subset fraction must lie in (0, 1), got 1.5"),
        (["--lds.count", "1"], "LDS needs at least 2 subsets (a rank correlation over them), got 1"),
        (["--lds.subset_seed", "1"], "was made under a different config"),
    ):
        assert line in counterfactual_error([*flags, *extra], capsys, "lds")
    other = tmp_path / "other_model"  # rankings of another model: refused before any training
    shutil.copytree(out / "attr" / "unlearning", other)
    ranking = json.loads((other / "q000" / "ranking.json").read_text())
    (other / "q000" / "ranking.json").write_text(json.dumps(ranking | {"model_fingerprint": "0" * 16}))
    (tmp_path / "empty").mkdir()
    candidates = tmp_path / "candidates"  # a candidate re-ranking: placeholders below the candidates, not scores
    shutil.copytree(out / "attr" / "unlearning", candidates)
    ranking = json.loads((candidates / "q000" / "ranking.json").read_text())
    ranking["stats"]["candidates"] = {"method": "pixel", "count": 5, "indices": [0, 1, 2, 3, 4]}
    (candidates / "q000" / "ranking.json").write_text(json.dumps(ranking))
    refusals = ((f"x={other}", "was made on another model"), (f"x={tmp_path / 'empty'}", "has no ranking"),
                (f"x={candidates}", "re-scored only 5 candidates for q000: its other scores are"))  # fmt: skip
    for rankings, line in refusals:
        new = [*flags[: flags.index("--rankings")], "--rankings", rankings, "--lds.count", "3", "--out",
               str(tmp_path / "lds2")]  # fmt: skip
        assert line in counterfactual_error(new, capsys, "lds")
    assert not (tmp_path / "lds2" / "models").exists()
    assert (tmp_path / "lds" / "lds.json").read_bytes() == before  # nothing overwritten


@pytest.mark.slow
def test_lds_script_runs_at_micro_scale_and_resumes(tmp_path):
    env = dict(os.environ, PRESET="micro", NUM_IMAGES="48", NUM_QUERIES="2", COUNT="3", METHODS="unlearning pixel")
    cmd = ["bash", "tiny/scripts/lds.sh", str(tmp_path)]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads((tmp_path / "lds" / "lds.json").read_text())
    assert list(table["rows"]) == ["unlearning", "pixel"] and table["subsets"] == 3
    assert all(set(row["queries"]) == {"q000", "q001"} for row in table["rows"].values())
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "[1/" not in again.stdout and "| unlearning |" in again.stdout
