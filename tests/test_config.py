import pytest

from tests.conftest import CONFIGS, cli
from trd_hpc.config import ConfigError, load_config


def test_paper_values_are_the_defaults_of_emt_yaml():
    c = load_config(CONFIGS / "emt.yaml").cohort
    assert c.n_subjects == 1000
    assert tuple(c.fmri.shape) == (48, 48, 24, 80) and c.fmri.noise_sd == 0.08 and c.fmri.dtype == "float16"
    r = c.regions
    assert (r["right_amygdala"].applies_to, r["right_amygdala"].offset_mean, r["right_amygdala"].offset_sd) == (
        "trd",
        0.5,
        0.1,
    )
    assert (r["dorsolateral_prefrontal"].applies_to, r["dorsolateral_prefrontal"].offset_mean) == ("trd", -0.4)
    assert (r["anterior_cingulate"].applies_to, r["anterior_cingulate"].offset_mean) == ("non_trd", 0.3)
    assert c.snp.n_snps == 800 and c.snp.n_predictive == 100
    assert c.snp.probs_trd == (0.40, 0.35, 0.25) and c.snp.probs_non_trd == (0.80, 0.15, 0.05)
    assert len(c.clinical.names) == 15 and c.clinical.sd == 0.8
    assert c.clinical.trd_shifts == {
        "severity": 2.0,
        "illness_duration": 1.5,
        "episode_count": 1.2,
        "functional_capacity": -1.5,
        "anxiety_comorbidity": 1.0,
    }
    assert (c.split.train, c.split.val, c.split.test) == (0.70, 0.15, 0.15)


def test_paper_values_are_the_defaults_of_cnn3d_yaml():
    c = load_config(CONFIGS / "cnn3d.yaml").cohort
    assert c.n_subjects == 1500 and tuple(c.shape) == (64, 64, 16) and c.seed == 42
    assert c.noise_sd == 0.01 and c.intensity_shift == 0.05
    assert c.class_probs == (0.25, 0.50, 0.25)
    assert c.split.test == 0.15 and c.split.folds == 5
    # separated classes (the paper's "distinct group separability"): 12.5-point gaps
    assert c.severity_ranges == ((75.0, 100.0), (37.5, 62.5), (0.0, 25.0))


def test_contiguous_variant_extends_cnn3d_yaml_changing_only_the_ranges():
    from trd_hpc.config import to_dict

    base, var = load_config(CONFIGS / "cnn3d.yaml"), load_config(CONFIGS / "cnn3d_contiguous.yaml")
    assert var.cohort.severity_ranges == ((66.7, 100.0), (33.3, 66.7), (0.0, 33.3))
    a, b = to_dict(base), to_dict(var)
    a["cohort"].pop("severity_ranges"), b["cohort"].pop("severity_ranges")
    assert a["data"].pop("cohort") != b["data"].pop("cohort")  # its own cohort directory
    assert a == b


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\ntask: cnn3d\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: key 'extends' makes a cycle"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'extends': config file not found: .*missing.yaml"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [x]\n")
    with pytest.raises(ConfigError, match=r"d.yaml: key 'extends' must name one config file"):
        load_config(tmp_path / "d.yaml")


def test_dotted_overrides_parse_types():
    cfg = load_config(
        CONFIGS / "emt.yaml",
        ["cohort.n_subjects=20000", "cohort.fmri.shape=[48,48,24,40]", "cohort.fmri.dtype=float32"],
    )
    assert cfg.cohort.n_subjects == 20000
    assert tuple(cfg.cohort.fmri.shape) == (48, 48, 24, 40)
    assert cfg.cohort.fmri.dtype == "float32"


@pytest.mark.parametrize(
    "name", ["emt_tiny.yaml", "cnn3d_tiny.yaml", "emt.yaml", "cnn3d.yaml", "cnn3d_contiguous.yaml"]
)
def test_seed_and_n_subjects_exist_in_both_cohort_configs(name):
    cfg = load_config(CONFIGS / name, ["cohort.n_subjects=100", "cohort.seed=3"])
    assert cfg.cohort.n_subjects == 100 and cfg.cohort.seed == 3


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "emt.yaml", ["cohort.n_subjectz=5"])
    msg = str(e.value)
    assert "cohort.n_subjectz" in msg and "n_subjects" in msg and "seed" in msg


def test_unknown_nested_key_under_a_named_region():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "emt.yaml", ["cohort.regions.right_amygdala.offset=1"])
    assert "cohort.regions.right_amygdala.offset" in str(e.value) and "offset_mean" in str(e.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "cnn3d.yaml", ["cohort.n_subjects=many"])
    assert "cohort.n_subjects" in str(e.value)


def test_semantic_errors_are_reported():
    with pytest.raises(ConfigError, match="right_amygdala.box"):
        load_config(CONFIGS / "emt.yaml", ["cohort.regions.right_amygdala.box=[[40,50],[0,4],[0,4]]"])
    with pytest.raises(ConfigError, match="probs_trd"):
        load_config(CONFIGS / "emt.yaml", ["cohort.snp.probs_trd=[0.5,0.5,0.5]"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(CONFIGS / "emt.yaml", ["cohort.n_subjects"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_rejects_unknown_key_and_writes_nothing(tmp_path):
    out = tmp_path / "c"
    r = cli("generate", str(CONFIGS / "emt_tiny.yaml"), "--out", str(out), "cohort.bogus=1", check=False)
    assert r.returncode == 2
    assert "cohort.bogus" in r.stderr and "n_subjects" in r.stderr
    assert not out.exists()


def test_help_explains_commands():
    r = cli("--help")
    for verb in ("generate", "cohort", "bench"):
        assert verb in r.stdout
    r = cli("generate", "--help")
    assert "--shard-index" in r.stdout and "KEY=VALUE" in r.stdout
