"""The cross-cutting helpers each concept has one home for: identities, atomic files, fingerprints, noise purposes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest
import torch

from common.config import NO_EFFECT, identity_settings
from common.errors import AttributionError
from common.files import atomic, read_json, read_safetensors, save_tensors, write_json
from common.fingerprints import fingerprint_tensors, module_fingerprint, settings_digest, weight_set_fingerprint
from common.keyed_random import Purpose, key_seed
from common.methods import get_method, methods


def _check_fields(cfg, identity: dict, where: str) -> int:
    """Every field of ``cfg`` is in ``identity`` exactly when it is not marked; the number of marked fields."""
    marked = 0
    for f in dataclasses.fields(cfg):
        left_out = bool(f.metadata.get(NO_EFFECT))
        assert (f.name not in identity) == left_out, f"{where}{f.name}"
        marked += left_out
        value = getattr(cfg, f.name)
        if not left_out and dataclasses.is_dataclass(value):
            marked += _check_fields(value, identity[f.name], f"{where}{f.name}.")
    return marked


def test_the_identity_leaves_out_exactly_the_fields_marked_as_not_changing_results():
    marked = 0
    for name in methods():
        cfg = get_method(name).Config()
        marked += _check_fields(cfg, identity_settings(cfg), f"{name}: ")
    assert marked >= 15  # batch sizes, chunks, compiling, checkpoints, memory caps
    cfg = get_method("unlearning").Config()
    faster = replace(cfg, loss=replace(cfg.loss, batch_size=7), scoring=replace(cfg.scoring, chunk_images=3))
    assert identity_settings(faster) == identity_settings(cfg)
    # the update's batch size decides which draws it takes (distinct timesteps per batch): it is part of a run
    other_draws = replace(cfg, unlearn=replace(cfg.unlearn, batch_size=40))
    assert (
        identity_settings(other_draws)["unlearn"]["batch_size"] == 40 != identity_settings(cfg)["unlearn"]["batch_size"]
    )


def test_atomic_writes_leave_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"done": 1})
    with pytest.raises(RuntimeError), atomic(path) as tmp:
        tmp.write_text('{"done": 2')  # half written, then the process fails
        raise RuntimeError("killed")
    assert read_json(path, "state") == {"done": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    save_tensors(tmp_path / "w.safetensors", {"a": torch.arange(3.0).T[None].expand(2, 3)})  # not contiguous
    assert torch.equal(read_safetensors(tmp_path / "w.safetensors")["a"], torch.arange(3.0).expand(2, 3))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(AttributionError, match="broken.json is damaged"):
        read_json(tmp_path / "broken.json", "state")


def test_fingerprints_tell_apart_what_differs_and_agree_on_what_does_not():
    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(3, 2)
    assert fingerprint_tensors(a) != fingerprint_tensors(b)  # same bytes, other shape
    assert fingerprint_tensors(a) != fingerprint_tensors(a.double())
    assert weight_set_fingerprint({"x": a}) != weight_set_fingerprint({"y": a}) and weight_set_fingerprint({}) == ""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    copy = torch.nn.Linear(3, 2)
    copy.load_state_dict(net.state_dict())
    assert module_fingerprint(net) == module_fingerprint(copy) and len(module_fingerprint(net)) == 16
    assert settings_digest({"a": 1, "b": [2]}) == settings_digest({"b": [2], "a": 1})  # key order does not matter
    assert settings_digest({"a": 1}) == settings_digest(json.loads(json.dumps({"a": 1})))


def test_noise_purposes_keep_their_numbers():
    # every recorded draw was keyed by these values: renumbering would silently change every score
    assert {p.name: p.value for p in Purpose} == {
        "SCORE": 1, "FISHER": 2, "QUERY": 3, "TRAIN": 4, "SAMPLE": 5, "EVAL": 6, "TRAK": 7, "PROJECTION": 8,
        "ENCODE": 9, "FINETUNE": 10, "FEATURES": 11,
    }  # fmt: skip
    assert key_seed(0, Purpose.SCORE, 5) == key_seed(0, 1, 5) and json.dumps(Purpose.EVAL) == "6"


def test_a_preset_sets_defaults_flags_override_it_and_unknown_settings_are_refused(tmp_path):
    import argparse

    from common.config import add_attribution_arguments, load_preset

    path = tmp_path / "presets.yaml"
    path.write_text(
        "default:\n  unlearn: {step_size: 0.5}\n  loss: {num_timesteps: 3}\n"
        "typo:\n  unlearn: {stepsize: 1}\nwrong_stage:\n  nonsense: {a: 1}\n"
    )

    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_attribution_arguments(parser)
        return load_preset(parser, argv=["--out", str(tmp_path), "--config", str(path), *argv])

    args = parse("--loss.num_timesteps", "4")
    assert getattr(args, "unlearn.step_size") == 0.5 and getattr(args, "loss.num_timesteps") == 4
    with pytest.raises(AttributionError, match="unknown setting unlearn.stepsize"):
        parse("--preset", "typo")
    with pytest.raises(AttributionError, match="unknown stage 'nonsense'"):
        parse("--preset", "wrong_stage")
    with pytest.raises(AttributionError, match="no preset 'missing'"):
        parse("--preset", "missing")


def test_progress_in_a_log_is_plain_lines_at_an_interval_and_a_bar_on_a_terminal(monkeypatch):
    import io

    from common.progress import progress_bar

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    log = io.StringIO()  # a file: not a terminal
    for _ in progress_bar(range(1000), desc="work", file=log, leave=False):
        pass
    lines = log.getvalue().splitlines(keepends=True)
    assert [line.split(" [")[0] for line in lines] == ["work: 0/1000", "work: 1000/1000"]  # the interval is 30 s
    assert all(line.endswith("]\n") and "\r" not in line for line in lines)  # the final count kept, leave=False or not
    log = io.StringIO()
    for _ in progress_bar(range(3), desc="work", file=log, mininterval=0, miniters=1):
        pass
    assert [line.split(" [")[0] for line in log.getvalue().splitlines()] == [f"work: {i}/3" for i in range(4)]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    for _ in progress_bar(range(3), desc="work", file=screen, mininterval=0):
        pass
    assert screen.getvalue().count("\r") >= 4 and "100%|" in screen.getvalue()  # tqdm's bar, redrawn in place
