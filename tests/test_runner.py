"""The sequential runner (docs/FORMULAS.md §9): resume equals an uninterrupted run, config overrides
through launch/edit.py, --help, and the shipped configs (docs/FORMULAS.md §R6)."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metake_jax import runner
from metake_jax.errors import EditError

REPO = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")  # shared: one statistics pass for the whole module


def _tiny(tmp: Path, name: str, stats: Path, **over):
    from configs import tiny_cf

    c = tiny_cf.get_config()
    c.method = "alphaedit"  # fewer compilations than metake; the protocol is the same
    c.batch_size = 2
    c.data.n = 8  # 4 batches
    c.eval.pre = c.eval.final = c.eval.batch = False
    c.stats.cache_dir = str(stats)
    c.run_dir = str(tmp / name)
    for k, v in over.items():
        setattr(c, k, v)
    return c


def _capture(into: dict):
    def hook(done, state):
        into[done] = (np.asarray(state.params["layers"]["mlp"]["fc_out"]["kernel"]), np.asarray(state.stats.Cp))
    return runner.RunHooks(after_checkpoint=hook)


def test_resume_matches_uninterrupted_run(tmp_path, stats_dir, monkeypatch):
    full: dict = {}
    cfull = _tiny(tmp_path, "full", stats_dir)
    cfull.eval.association = True  # β, γ per request in the log; must not change any weight (checked below)
    ref = runner.run(cfull, hooks=_capture(full))
    ids = [cid for b in ref["batches"] for cid in b["case_ids"]]
    assert len(ids) == 8 and sorted(set(ids)) == sorted(ids)
    for b in ref["batches"]:
        assert len(b["beta"]) == len(b["gamma"]) == len(b["case_ids"]) == 2
        assert all(x > 0 for x in b["beta"]) and all(np.isfinite(b["gamma"]))
    logged = [json.loads(x) for x in (tmp_path / "full" / "edit_log.jsonl").read_text().splitlines()]
    assert [e["gamma"] for e in logged] == [b["gamma"] for b in ref["batches"]]

    # run B: stopped by an exception right after the checkpoint of batch 2 of 4
    part: dict = {}

    def stop_after_2(done, state):
        _capture(part).after_checkpoint(done, state)
        if done == 2:
            raise _Stop()

    # ... writing checkpoints in the older format, with the run RNG key the stream never used
    real_save = runner.RunCheckpointer.save

    def old_format_save(self, step, arrays, meta):
        real_save(self, step, {**arrays, "rng": np.array([0, 7], np.uint32)}, meta)

    with monkeypatch.context() as m, pytest.raises(_Stop):
        m.setattr(runner.RunCheckpointer, "save", old_format_save)
        runner.run(_tiny(tmp_path, "resumed", stats_dir), hooks=runner.RunHooks(after_checkpoint=stop_after_2))
    assert sorted(part) == [1, 2]

    # a failing batch 3 leaves the state at batch 2 and names the batch and its case ids
    real = runner.edit_batch
    monkeypatch.setattr(runner, "edit_batch", lambda *a, **k: (_ for _ in ()).throw(EditError("injected")))
    with pytest.raises(runner.RunError, match=r"batch 3/4 \(case ids \[" + f"{ids[4]}, {ids[5]}"):
        runner.run(_tiny(tmp_path, "resumed", stats_dir, resume=True))
    monkeypatch.setattr(runner, "edit_batch", real)

    # resume: batches 3 and 4 only, same final weights and C_p as the uninterrupted run
    rest: dict = {}
    res = runner.run(_tiny(tmp_path, "resumed", stats_dir, resume=True), hooks=_capture(rest))
    assert sorted(rest) == [3, 4] and res["resumed_from_batch"] == 2
    np.testing.assert_allclose(rest[4][0], full[4][0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(rest[4][1], full[4][1], rtol=0, atol=1e-6)
    assert np.abs(full[4][0] - full[1][0]).max() > 0  # the edits did change the weights
    log = [json.loads(x) for x in (tmp_path / "resumed" / "edit_log.jsonl").read_text().splitlines()]
    assert [cid for e in log for cid in e["case_ids"]] == ids  # every case exactly once, in order
    assert [e["batch"] for e in log] == [1, 2, 3, 4]


def test_launch_edit_config_overrides(tmp_path, stats_dir, monkeypatch):
    """--config.x=y overrides through the absl entry point (in-process, the tiny config)."""
    monkeypatch.syspath_prepend(str(REPO / "launch"))
    edit = importlib.import_module("edit")
    from absl import flags

    run_dir = tmp_path / "cli"
    argv = ["edit.py", f"--config={REPO / 'configs' / 'tiny_cf.py'}", "--config.method=alphaedit",
            "--config.batch_size=2", "--config.data.n=4", f"--config.run_dir={run_dir}",
            f"--config.stats.cache_dir={stats_dir}", "--config.eval.batch=False",
            f"--config.export_hf={tmp_path / 'hf'}"]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
        edit.main([argv[0]])
    finally:
        flags.FLAGS.unparse_flags()
    r = json.loads((run_dir / "results.json").read_text())
    assert r["method"] == "alphaedit" and r["batch_size"] == 2 and r["n_cases"] == 4 and r["n_batches"] == 2
    assert r["config"]["data"]["n"] == 4 and r["pre"]["efficacy"] is not None and r["post"] is not None
    assert (run_dir / "results.md").is_file() and (run_dir / "plots" / "timings.png").is_file()
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    # launch/compare.py: one row per run, the numbers of each results.json, mixed benchmarks refused
    compare = importlib.import_module("compare")
    from metake_jax.report import compare_table

    table = compare_table([r, r], names=["a", "b"])
    for name in ("a", "b"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |")).split("|")
        assert float(row[2]) == pytest.approx(r["post"]["efficacy"], abs=5e-3)
        assert float(row[4]) == pytest.approx(r["post"]["specificity"], abs=5e-3)
    unedited = next(line for line in table.splitlines() if line.startswith("| unedited |")).split("|")
    assert float(unedited[2]) == pytest.approx(r["pre"]["efficacy"], abs=5e-3)
    with pytest.raises(ValueError, match="mix benchmarks"):
        compare_table([r, {**r, "kind": "zsre"}])
    assert compare.main([str(run_dir)]) == 0 and compare.main([str(tmp_path / "nope")]) == 2


def test_help_lists_flags():
    out = subprocess.run([sys.executable, str(REPO / "launch" / "edit.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr  # asked-for help is a success (absl alone exits 1)
    assert "--config" in out.stdout and "--config.batch_size" in out.stdout


REF = {  # docs/FORMULAS.md §R6 (AE hparams/AlphaEdit and hparams/MEMIT)
    "gpt2xl": dict(layers=(13, 14, 15, 16, 17), lr=0.5, steps=20, lam=20000.0),
    "gptj": dict(layers=(3, 4, 5, 6, 7, 8), lr=0.5, steps=25, lam=15000.0),
    "llama3": dict(layers=(4, 5, 6, 7, 8), lr=0.1, steps=25, lam=15000.0),
}


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__"))
def test_configs_load(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    for field in ("model", "dtype", "data", "method", "batch_size", "layers", "stage1", "editor", "metake", "stats",
                  "eval", "templates", "run_dir", "resume", "export_hf", "seed"):
        assert field in c, (name, field)
    assert c.method in runner.METHODS
    runner.edit_config(c)  # every config maps to a valid EditConfig
    family = name.split("_")[0]
    if family in REF:
        r = REF[family]
        assert tuple(c.layers) == r["layers"]
        assert (c.stage1.lr, c.stage1.steps) == (r["lr"], r["steps"])
        assert (c.stage1.clamp_norm_factor, c.stage1.kl_factor, c.stage1.weight_decay) == (0.75, 0.0625, 0.5)
        assert (c.editor.alphaedit.l2, c.editor.nullspace_threshold, c.editor.memit.mom2_update_weight) == (10.0, 2e-2, r["lam"])
        assert c.stats.n_samples == 100000 and c.batch_size == 100


def test_smollm2_configs_share_tuned_dict():
    from configs import smollm2_cf, smollm2_zsre

    t = smollm2_cf.SMOLLM2_TUNED
    for mod in (smollm2_cf, smollm2_zsre):
        c = mod.get_config()
        assert tuple(c.layers) == tuple(t["layers"]) and c.stage1.lr == t["lr"] and c.stage1.steps == t["steps"]


def test_fingerprint_default_precision_matches_older_checkpoints():
    """A checkpoint written before ``stats.precision`` existed still resumes; another precision does not."""
    from configs.smollm2_cf import get_config

    c = get_config()
    assert c.stats.precision == "highest"
    old = c.to_dict()
    del old["stats"]["precision"]
    fp_old = runner._fingerprint(old)  # what a run written before the field existed stored
    assert runner._diff(runner._fingerprint(c), fp_old) == []
    c.stats.precision = "default"
    assert runner._diff(runner._fingerprint(c), fp_old) == ["stats.precision: checkpoint None vs config 'default'"]
    c.stats.precision = "tf32"  # refused at config time, naming the field
    with pytest.raises(runner.RunError, match=r"config.stats.precision='tf32' is not one of highest, high, default"):
        runner.edit_config(c)


def _legacy_fingerprint(d: dict) -> dict:
    """The fingerprint as the ConfigDict-based runner computed it (before RunConfig): the oracle for
    checkpoints written by older versions."""
    keep = ("model", "dtype", "data", "method", "batch_size", "layers", "stage1", "editor", "metake", "stats",
            "templates", "seed")
    fp = json.loads(json.dumps({k: d.get(k) for k in keep}, default=str))
    if not str(fp.get("method", "")).startswith("metake"):
        fp.pop("metake", None)
    for path, default in {"stats.precision": "highest", "data.chat": False}.items():
        section, leaf = path.split(".")
        if fp[section].get(leaf) == default:
            del fp[section][leaf]
    for leaf in ("prefix_reuse", "compact", "norm_ref"):  # Stage I fields added after the ConfigDict runner
        fp["stage1"].pop(leaf, None)
    fp["templates"].pop("lengths", None)  # added with ROME's template set
    return fp


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__"))
def test_fingerprint_resumes_checkpoints_of_the_configdict_runner(name):
    """A checkpoint whose fingerprint the ConfigDict-based runner wrote resumes under the typed config
    (same fields, same layout), for every shipped config and a MetaKE variant; a changed field does not."""
    c = importlib.import_module(f"configs.{name}").get_config()
    for method in (c.method, "metake_keyonly"):
        c.method = method
        stored = _legacy_fingerprint(c.to_dict())
        assert runner._resume_diff(runner._fingerprint(c), stored) == []
    c.metake.weights.anchor = 0.5
    assert runner._resume_diff(runner._fingerprint(c), stored) == [
        "metake.weights.anchor: checkpoint 1.0 vs config 0.5"]


# The fingerprint fields run checkpoints recorded when the typed config came in (RunConfig, at metake).
_FINGERPRINT_FIELDS = {
    "batch_size", "data.chat", "data.format", "data.n", "data.path", "data.seed", "dtype", "editor.energy",
    "editor.nullspace_threshold", "layers",
    "metake.anchor", "metake.feedback", "metake.gate", "metake.line_search", "metake.lr", "metake.max_halvings",
    "metake.prompts", "metake.steps", "metake.weights.anchor", "metake.weights.edit", "metake.weights.loc", "method",
    "model", "seed", "stage1.clamp_norm_factor", "stage1.early_stop", "stage1.kl_factor", "stage1.lr",
    "stage1.row_groups", "stage1.steps", "stage1.weight_decay", "stats.cache_dir", "stats.config", "stats.kind",
    "stats.max_len", "stats.n_samples", "stats.name", "stats.paths", "stats.precision", "stats.seed", "stats.split",
    "stats.token_budget", "templates.file", "templates.length", "templates.n_per_prompt", "templates.seed",
}


def test_new_fingerprinted_fields_keep_old_checkpoints_resumable():
    """A field added to a fingerprinted section (stage1, editor, metake, stats, data, templates) must be
    listed in runner._ADDED_LATER with the value older runs implied, else their checkpoints stop resuming.
    (``editor.<name>.*`` are exempt: ``_editor_fingerprint`` fills every editor field at its default.)"""
    from metake_jax.run_config import RunConfig

    def flat(d, prefix=""):
        return {k for key, v in d.items() for k in (flat(v, f"{prefix}{key}.") if isinstance(v, dict)
                                                     else {f"{prefix}{key}"})}

    fp = {k for k in flat(runner._fingerprint(RunConfig(method="metake"))) if not k.startswith("editor.alphaedit.")}
    new = fp - _FINGERPRINT_FIELDS - set(runner._ADDED_LATER)
    assert not new, f"fingerprinted fields {sorted(new)}: add them to runner._ADDED_LATER (value older runs implied)"
    assert _FINGERPRINT_FIELDS - set(runner._ADDED_LATER) <= fp  # nothing recorded before disappeared
