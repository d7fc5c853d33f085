"""Fail closed on data and on resume: a mistyped cohort path is an error (never a synthetic
cohort trained on in its place), every run names the cohort it rests on, and rerunning the
same command continues the run, with the ways out (never, fresh) explicit."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

from tests.conftest import CONFIGS, REPO, cli

TINY = str(CONFIGS / "emt_tiny.yaml")
QUICK = ("train.max_epochs=1", "--no-eval", "--quiet", "tracking.wandb=false")


def test_a_mistyped_cohort_path_is_an_error_naming_the_closest_cohort(tmp_path, emt_cohort_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(emt_cohort_dir, data / "my_study")
    typo = data / "my_studdy"
    r = cli("train", TINY, "--out", str(tmp_path / "run"), f"data.cohort={typo}", *QUICK, check=False)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: data.cohort={typo}: no such directory")
    assert f"did you mean {data / 'my_study'}?" in line and "--generate" in line
    assert not typo.exists() and not (tmp_path / "run" / "checkpoints").exists()
    # cv and tune go through the same check
    r = cli("cv", str(CONFIGS / "cnn3d_tiny.yaml"), "--out", str(tmp_path / "cv"), f"data.cohort={typo}", check=False)
    assert r.returncode == 2 and f"data.cohort={typo}: no such directory" in r.stderr
    assert not typo.exists()


def test_an_empty_directory_is_not_a_cohort_either(tmp_path):
    empty = tmp_path / "cohort"
    empty.mkdir()
    r = cli("train", TINY, "--out", str(tmp_path / "run"), f"data.cohort={empty}", *QUICK, check=False)
    assert r.returncode == 2 and "no manifest.json there" in r.stderr
    assert list(empty.iterdir()) == []


def test_generate_is_asked_for_said_and_recorded(tmp_path):
    cohort = tmp_path / "cohort"
    run = tmp_path / "run"
    r = cli("train", TINY, "--out", str(run), f"data.cohort={cohort}", "--generate", *QUICK)
    assert f"data.generate: generating a synthetic cohort (paper 000 generator, seed 7, 64 subjects) at {cohort}" in (
        r.stdout + r.stderr
    )
    ident = json.loads((run / "metrics.json").read_text())["cohort"]
    digest = hashlib.sha256((cohort / "manifest.json").read_bytes()).hexdigest()
    assert ident["manifest_sha256"] == digest and len(digest) == 64
    assert (ident["origin"], ident["kind"], ident["seed"], ident["generator"]) == ("synthetic", "emt", 7, "paper 000")
    assert "synthetic cohort (paper 000 generator, seed 7)" in r.stdout + r.stderr


def test_the_same_command_rerun_continues_never_refuses_fresh_restarts(tmp_path, emt_cohort_dir):
    run = tmp_path / "run"
    args = ("train", TINY, "--out", str(run), f"data.cohort={emt_cohort_dir}", *QUICK)
    cli(*args)
    first = (run / "model.pt").read_bytes()
    again = cli(*args)
    assert f"{run} holds this run (same config): continuing it" in again.stdout + again.stderr
    assert (run / "model.pt").read_bytes() == first  # nothing retrained: the run had finished

    never = cli(*args, "--resume", "never", check=False)
    assert never.returncode == 2 and "--resume never" in never.stderr.strip().splitlines()[-1]
    other = cli(*args, "train.lr=0.005", check=False)
    assert other.returncode == 2 and "differs" in other.stderr and "train.lr" in other.stderr

    # every checkpoint unreadable: an error that says so, not a silent restart from step 0
    ckpts = sorted((run / "checkpoints").iterdir())
    assert ckpts
    for p in ckpts:
        p.write_bytes(b"garbage")
    bad = cli(*args, check=False)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 1 and "none of its" in last and "--resume fresh" in last, bad.stderr
    assert "starting from scratch" not in bad.stdout + bad.stderr  # what it said before: and retrained
    assert all(p.read_bytes() == b"garbage" for p in ckpts)  # nothing was changed

    fresh = cli(*args, "--resume", "fresh")
    assert "starting the run again from step 0" in fresh.stdout + fresh.stderr
    assert (run / "model.pt").read_bytes() == first  # same config and seed: the same weights (CPU)


def test_a_pickle_checkpoint_error_does_not_advise_running_it(tmp_path, emt_cohort_dir):
    run = tmp_path / "run"
    args = ("train", TINY, "--out", str(run), f"data.cohort={emt_cohort_dir}", *QUICK)
    cli(*args)
    import torch

    for p in (run / "checkpoints").iterdir():
        torch.save({"format": object}, p)  # a pickled class: refused by weights_only
    bad = cli(*args, check=False)
    assert bad.returncode == 1 and "never unpickled" in bad.stderr
    assert "weights_only` set to `False" not in bad.stderr


def test_ctrl_c_names_the_checkpoint_kept_and_the_command_that_continues(tmp_path, emt_cohort_dir):
    run = tmp_path / "run"
    args = [
        "train",
        TINY,
        "--out",
        str(run),
        f"data.cohort={emt_cohort_dir}",
        "train.max_epochs=2",
        "train.checkpoint_every_steps=2",
        "--no-eval",
        "--quiet",
        "tracking.wandb=false",
    ]
    env = {**os.environ, "TRD_FAULT": "after-step:5", "TRD_FAULT_KILL": "pause"}
    p = subprocess.Popen(
        [sys.executable, "-m", "trd_hpc.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    for line in p.stderr:  # wait for the fault point, then press Ctrl-C
        seen.append(line)
        if "TRD_FAULT: paused" in line:
            p.send_signal(signal.SIGINT)
            break
    rest = p.stderr.read()
    p.wait(timeout=120)
    last = (("".join(seen) + rest).strip().splitlines() or [""])[-1]
    assert p.returncode == 130, "".join(seen) + rest
    assert last.startswith("interrupted; newest checkpoint kept: ") and "step-000000004.pt (step 4)" in last
    assert f"continue with: trd-hpc train {TINY} --out {run}" in last
    # and that command continues
    r = cli(*args[:-1])
    assert "resumed from" in r.stdout + r.stderr and "(epoch 1, step 4)" in r.stdout + r.stderr
