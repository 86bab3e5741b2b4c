"""Config checks: rules declared beside each field, every problem of a config reported at once,
normalizer parameters finite (in configs and in the library), sweep values distinct."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from attnlab import cli, experiments, losses, normalizers
from attnlab.experiments import (
    calibration,
    distillation,
    fading_synthetic,
    length_generalization,
    lm,
    needle,
    sparsity,
)
from attnlab.experiments.checks import (
    SettingError,
    at_least,
    check,
    distinct,
    each,
    finite,
    nonempty,
    noted,
    positive,
    problems,
    setting,
)
from attnlab.experiments.config import ConfigError, Lengths
from attnlab.experiments.runner import check_mesh
from attnlab.normalizers import NormalizerSpec as LayerSpec
from attnlab.train.mesh import MeshConfig, default_mesh_config, make_mesh, use_mesh

SETTINGS = (
    fading_synthetic.Config,
    sparsity.Config,
    length_generalization.Config,
    needle.Config,
    calibration.Config,
    distillation.Config,
    lm.ModelSetting,
    lm.TrainingSetting,
)


def _write(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        experiments.load(path)
    return err.value.problems


@dataclasses.dataclass(frozen=True)
class Demo:
    n: int = setting(1, at_least(1))
    xs: tuple[float, ...] = setting((1.0,), nonempty, each(positive), distinct)
    low: float = setting(0.0, finite)
    high: float = setting(1.0, noted(finite, "the top"))

    def relations(self):
        if self.low >= self.high:
            yield "{low} must be below {high}"

    def __post_init__(self):
        check(self)


def test_check_lists_every_field_problem_and_the_relations_of_valid_fields():
    with pytest.raises(SettingError) as err:
        Demo(n=0, xs=(1.0, 1.0, -2.0), low=2.0)
    assert err.value.problems == [
        "n must be >= 1; got 0",
        "xs must all be > 0 and not repeat a value; got [1.0, 1.0, -2.0]",
        "low=2.0 must be below high=1.0",
    ]
    # The same problems under a table's dotted key, as a config file's nested table shows them.
    assert problems(err.value.setting, "demo.")[2] == "demo.low=2.0 must be below demo.high=1.0"


def test_a_relation_is_not_judged_on_a_rejected_value():
    with pytest.raises(SettingError) as err:
        Demo(low=2.0, high=math.inf)
    assert err.value.problems == ["high must be a finite number (the top); got inf"]
    # heads = 0 is reported once by its rule; width % heads is never computed on it.
    with pytest.raises(SettingError) as err:
        lm.ModelSetting(width=0, heads=0)
    assert err.value.problems == ["width must be > 0; got 0", "heads must be > 0; got 0"]


def test_every_bad_value_of_a_config_is_reported_in_one_run(tmp_path):
    path = _write(
        tmp_path,
        'kind = "sparsity"\n'
        'normalizers = ["softmax", { name = "ssmax", s = inf }, { name = "sigmoid", bias = nan }]\n'
        'inputs = ["synthetic", "dream"]\n'
        "lengths = [10, 100, 10]\n"
        "scales = [1.0, 2.0, 1.0]\n"
        "model_scales = [0.5, -1.0]\n"
        "seeds = 0\n"
        "[model]\nwidth = 0\n"
        "[training]\nlearning_rate = -1.0\nsteps = 0\n",
    )
    found = _problems(path)
    expected = [
        "normalizers[1]: ssmax: parameter 's' must be finite; got [inf]",
        "normalizers[2]: sigmoid: parameter 'bias' must be finite; got [nan]",
        "inputs must all be one of synthetic, model; got ['synthetic', 'dream']",
        "lengths must not repeat a value; got [10, 100, 10]",
        "scales must not repeat a value; got [1.0, 2.0, 1.0]",
        "model_scales must all be > 0; got [0.5, -1.0]",
        "seeds must be >= 1; got 0",
        "model.width must be > 0; got 0",
        "training.steps must be > 0; got 0",
        "training.learning_rate must be > 0; got -1.0",
    ]
    assert sorted(found) == sorted(f"{path}: {line}" for line in expected), "\n".join(found)


def test_a_relation_is_reported_beside_bad_values_of_other_fields(tmp_path):
    path = _write(
        tmp_path,
        'kind = "fading_synthetic"\nnormalizers = [{ name = "scaled_softmax", temperature = inf }]\n'
        "seeds = 0\npeak_logit = -5.0\n",
    )
    found = _problems(path)
    assert len(found) == 3, found
    assert f"{path}: peak_logit=-5.0 must be above rest_logit=-2.0" in found
    assert f"{path}: seeds must be >= 1; got 0" in found
    assert any("normalizers[0]: scaled_softmax: parameter 'temperature' must be finite" in p for p in found)


@pytest.mark.parametrize(
    ("kind", "line", "key"),
    [
        ("fading_synthetic", "lengths = [10, 10]", "lengths"),
        ("fading_synthetic", "sigmas = [1.0, 1.0]", "sigmas"),
        ("sparsity", "scales = [2.0, 2]", "scales"),
        ("sparsity", "model_scales = [1.0, 1.0]", "model_scales"),
        ("sparsity", 'inputs = ["model", "model"]', "inputs"),
        ("length_generalization", "rope_theta_factors = [1.0, 1.0]", "rope_theta_factors"),
        ("needle", "eval_lengths = [128, 128]", "eval_lengths"),
        ("needle", "depths = [0.5, 0.5]", "depths"),
        ("needle", "rope_theta_factors = [50.0, 50.0]", "rope_theta_factors"),
        ("distillation", "temperatures = [2.0, 2.0]", "temperatures"),
        ("distillation", "weights = [0.5, 0.5]", "weights"),
    ],
)
def test_duplicate_sweep_values_are_rejected(tmp_path, kind, line, key):
    found = _problems(_write(tmp_path, f'kind = "{kind}"\n{line}\n'))
    assert len(found) == 1 and f": {key} must not repeat a value; got " in found[0], found


def test_duplicate_normalizers_are_rejected(tmp_path):
    found = _problems(_write(tmp_path, 'kind = "fading_synthetic"\nnormalizers = ["ssmax", "ssmax"]\n'))
    assert len(found) == 1 and "labels must be unique" in found[0]
    with pytest.raises(SettingError, match=r"lengths must not repeat a value; got \[10, 10\]"):
        Lengths((10, 10))


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        ("ssmax", {"s": math.inf}, "s"),
        ("ssmax", {"bias": math.nan}, "bias"),
        ("logn_entmax", {"alpha": 1.5, "n": math.inf}, "n"),
        ("scaled_softmax", {"temperature": math.inf}, "temperature"),
        ("entmax", {"alpha": math.inf}, "alpha"),
        ("sigmoid", {"bias": -math.inf}, "bias"),
        ("softpick", {"eps": math.nan}, "eps"),
        ("multimax", {"b_high": math.inf}, "b_high"),
    ],
)
def test_the_library_rejects_non_finite_normalizer_parameters(name, params, bad):
    with pytest.raises(ValueError, match=rf"^{name}: parameter '{bad}' must be finite; got \[-?(inf|nan)\]$"):
        normalizers.get(name, **params)
    finite_params = {key: 1.5 for key in params}
    normalizers.get(name, **finite_params)  # the same parameters, finite, are accepted


def test_non_finite_entries_of_an_array_parameter_are_named():
    s = jnp.asarray([0.4, jnp.inf, 0.5, jnp.nan]).reshape(4, 1)
    with pytest.raises(ValueError, match=r"ssmax: parameter 's' must be finite; got \[inf, nan\]"):
        normalizers.ssmax(jnp.zeros((4, 3)), s=s)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LayerSpec("ssmax", {"s": math.inf}), r"ssmax: parameter 's' must be finite; got \[inf"),
        (lambda: LayerSpec("ssmax", {"bias": math.nan}, learn=("bias",)), r"parameter 'bias' must be finite"),
        (lambda: LayerSpec("entmax", {"alpha": math.nan}, learn=("alpha",)), r"parameter 'alpha' must be finite"),
        (
            lambda: LayerSpec("scaled_softmax", params={"temperature": math.inf}),
            r"scaled_softmax: parameter 'temperature' must be finite; got \[inf\]",
        ),
        (lambda: LayerSpec("sigmoid", params={"bias": -math.inf}), r"parameter 'bias' must be finite; got \[-inf\]"),
        (
            lambda: losses.OutputNormalizer("entmax", alpha=math.inf),
            r"OutputNormalizer: parameter 'alpha' must be finite; got \[inf\]",
        ),
        (
            lambda: losses.fenchel_young_loss(jnp.zeros(3), 0, mapping="entmax", alpha=math.inf),
            r"fenchel_young_loss: parameter 'alpha' must be finite",
        ),
    ],
)
def test_layer_and_output_normalizers_reject_non_finite_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_trained_normalizers_and_outputs_in_a_config_must_be_finite(tmp_path):
    path = _write(
        tmp_path,
        'kind = "calibration"\noutputs = ["softmax", { mapping = "entmax", alpha = inf }]\n'
        "[training]\nlearning_rate = nan\n",
    )
    found = _problems(path)
    assert len(found) == 2, found
    assert any("outputs[1]: OutputNormalizer: parameter 'alpha' must be finite" in p for p in found)
    assert any("training.learning_rate: expected a finite number; got nan" in p for p in found)
    path = _write(tmp_path, 'kind = "needle"\nnormalizers = [{ name = "ssmax", s = inf }]\n', "b.toml")
    assert any("normalizers[0]: ssmax: parameter 's' must be finite" in p for p in _problems(path))


@pytest.mark.parametrize("setting_type", SETTINGS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_number_field_rejects_inf_and_nan(setting_type):
    hints = typing.get_type_hints(setting_type)
    numbers = [name for name, hint in hints.items() if hint in (float, int, tuple[float, ...], tuple[int, ...])]
    assert numbers
    for name in numbers:
        for bad in (math.inf, math.nan):
            value = (bad,) if typing.get_origin(hints[name]) is tuple else bad
            with pytest.raises(SettingError) as err:
                setting_type(**{name: value})
            assert any(p.startswith(f"{name} must ") for p in err.value.problems), (name, err.value.problems)


@pytest.mark.parametrize("setting_type", SETTINGS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_default_is_valid(setting_type):
    assert problems(setting_type()) == []


@pytest.mark.parametrize(
    "text",
    [
        'kind = "fading_synthetic"\nnormalizers = [{ name = "ssmax", s = inf }]\nlengths = [10]\n',
        'kind = "fading_synthetic"\nnormalizers = [{ name = "ssmax", bias = nan }]\nlengths = [10]\n',
        'kind = "fading_synthetic"\nlengths = [10, 10]\nseeds = 1\n',
        'kind = "fading_synthetic"\nlengths = [10]\nsigmas = [1.0, 1.0]\n',
    ],
)
def test_the_cli_exits_2_and_writes_nothing_for_non_finite_or_repeated_values(tmp_path, capsys, text):
    out = tmp_path / "out"
    assert cli.main(["run", str(_write(tmp_path, text)), "--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "must be finite" in err or "must not repeat a value" in err


# --- the [mesh] table: how the models of a run are laid out on the devices -----------------------


def test_a_mesh_table_is_checked_with_the_config(tmp_path):
    path = _write(tmp_path, 'kind = "mqar"\n[mesh]\nfsdp = 0\n')
    assert _problems(path) == [f"{path}: [mesh] MeshConfig.fsdp must be an int >= 1; got 0"]
    path = _write(tmp_path, 'kind = "mqar"\n[mesh]\ntensr = 2\n')
    assert _problems(path) == [f"{path}: [mesh] has unknown keys tensr; accepted: data, fsdp, tensor"]
    experiment = experiments.load(_write(tmp_path, 'kind = "mqar"\n[mesh]\nfsdp = 2\n'))
    assert experiment.mesh == MeshConfig(fsdp=2) and "mesh" not in experiment.spec.config_json(experiment.config)


def test_a_mesh_that_cannot_hold_a_batch_of_the_config_stops_the_run_before_any_work(tmp_path, capsys):
    path = _write(tmp_path, 'kind = "mqar"\n[training]\nbatch_size = 6\n[mesh]\ndata = 4\n')
    with pytest.raises(ConfigError) as error:
        check_mesh(experiments.load(path), 8)
    assert error.value.problems == [
        f"{path}: [mesh] (training.batch_size = 6): the batch size 6 must be a multiple of data x fsdp = 4 x 1 = 4 "
        "(the mesh's batch axes): change the batch size or the mesh"
    ]
    too_many = jax.device_count() + 1
    code = cli.main(["run", str(path), "--out", str(tmp_path / "out"), "--set", f"mesh.data={too_many}"])
    assert code == 2
    needs = f"data x fsdp x tensor = {too_many} x 1 x 1 needs {too_many} devices; {jax.device_count()} here"
    assert needs in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    check_mesh(experiments.load(path, ["mesh.data=2"]), 8)  # 6 rows over 2


def test_use_mesh_sets_the_mesh_every_model_of_a_run_trains_on():
    assert default_mesh_config() == MeshConfig()
    with use_mesh(MeshConfig(data=1)):
        assert make_mesh().devices.shape == (1, 1, 1)
    assert default_mesh_config() == MeshConfig()
