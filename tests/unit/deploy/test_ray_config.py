"""``kiln deploy ray`` without a Ray cluster: config rules, the ``serve run`` YAML, the CLI.

The real-cluster tests are in tests/integration/test_deploy_ray.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from modelkiln.deploy import ray_config, ray_run
from modelkiln.deploy.ray_config import load_ray_config, serve_run_config, write_ray
from modelkiln.deploy.ray_policy import PredictivePolicy
from modelkiln.errors import ConfigError, DependencyMissingError


def test_fixed_replicas_config_is_serve_run_shaped(model_dir: Path, tmp_path: Path) -> None:
    cfg = load_ray_config(models=[{"path": model_dir}], num_replicas=2)
    (path,) = write_ray(cfg, tmp_path / "out")
    doc = yaml.safe_load(path.read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "modelkiln.deploy.ray_app:build_app"
    assert app["route_prefix"] == "/" and app["name"] == "model"
    assert app["args"]["model"] == {"path": str(model_dir.resolve()), "name": "model"}
    (dep,) = app["deployments"]
    assert dep["name"] == "kiln" and dep["num_replicas"] == 2
    assert "autoscaling_config" not in dep
    assert app["args"]["deployment"] == dep
    assert app["args"]["retries"] == 1  # the ingress re-sends once, then 503
    assert app["args"]["ingress"] is True
    direct = serve_run_config(load_ray_config(models=[{"path": model_dir}], ingress=False))
    assert direct["applications"][0]["args"]["ingress"] is False


def test_model_options_reach_the_replicas_spec(model_dir: Path) -> None:
    cfg = load_ray_config(models=[{"path": model_dir, "options": {"backend": "torch"}}])
    spec = serve_run_config(cfg)["applications"][0]["args"]["model"]
    assert spec == {"backend": "torch", "path": str(model_dir.resolve()), "name": "model"}


def test_serve_run_config_validates_against_rays_schema(model_dir: Path) -> None:
    schema = pytest.importorskip("ray.serve.schema")
    cfg = load_ray_config(
        models=[{"path": model_dir}, {"path": model_dir, "name": "second"}],
        autoscaling={"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 1},
    )
    parsed = schema.ServeDeploySchema.model_validate(serve_run_config(cfg))
    assert [a.route_prefix for a in parsed.applications] == ["/model", "/second"]
    auto = parsed.applications[0].deployments[0].autoscaling_config
    assert auto["max_replicas"] == 3 and auto["upscale_delay_s"] == 1


def test_replicas_and_autoscaling_together_name_the_field(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="num_replicas and autoscaling"):
        load_ray_config(models=[{"path": model_dir}], num_replicas=2, autoscaling={})


def test_min_above_max_names_the_field(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"min_replicas=5 > max_replicas=2"):
        load_ray_config(
            models=[{"path": model_dir}], autoscaling={"min_replicas": 5, "max_replicas": 2}
        )


def test_missing_model_path_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models.path: .*nope is not a directory"):
        load_ray_config(models=[{"path": tmp_path / "nope"}])


def test_model_too_large_for_declared_memory(model_dir: Path) -> None:
    (model_dir / "model.safetensors").write_bytes(b"\0" * 1000)
    with pytest.raises(ConfigError, match=r"ray_actor_options.memory=1500 bytes.*2000 bytes"):
        load_ray_config(models=[{"path": model_dir}], ray_actor_options={"memory": 1500})
    cfg = load_ray_config(models=[{"path": model_dir}], ray_actor_options={"memory": 2000})
    assert cfg.ray_actor_options.memory == 2000


def test_ray_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # find_spec raises for a None entry
    with pytest.raises(DependencyMissingError, match=r"ray\[serve\]") as info:
        ray_run.require_ray()
    assert info.value.extra == "ray" and "modelkiln[ray]" in str(info.value.hint)


def _cli(args: list[str]) -> tuple[int, str]:
    from modelkiln.cli import app

    result = CliRunner().invoke(app, ["deploy", "ray", *args])
    return result.exit_code, result.output


def test_cli_writes_autoscaling_config(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = _cli([str(out), "--model-path", str(model_dir), "--min-replicas", "1",
                         "--max-replicas", "4", "--target-ongoing-requests", "2",
                         "--upscale-delay-s", "1", "--downscale-delay-s", "2"])  # fmt: skip
    assert code == 0, output
    dep = yaml.safe_load((out / "serve_config.yaml").read_text())["applications"][0]
    auto = dep["deployments"][0]["autoscaling_config"]
    assert auto["max_replicas"] == 4 and auto["target_ongoing_requests"] == 2
    assert auto["downscale_delay_s"] == 2


def test_cli_bad_inputs_exit_with_one_clear_error(model_dir: Path, tmp_path: Path) -> None:
    code, output = _cli([str(tmp_path), "--model-path", str(model_dir), "--replicas", "2",
                         "--max-replicas", "3"])  # fmt: skip
    assert code != 0 and "num_replicas and autoscaling" in output
    code, output = _cli([str(tmp_path), "--model-path", str(model_dir),
                         "--min-replicas", "4", "--max-replicas", "3"])  # fmt: skip
    assert code != 0 and "min_replicas=4 > max_replicas=3" in output


def test_no_ray_import_at_config_time() -> None:
    assert "ray" not in ray_config.__dict__ and "ray" not in ray_run.__dict__


def test_predictive_policy_config_validates_against_rays_schema(model_dir: Path) -> None:
    schema = pytest.importorskip("ray.serve.schema")
    cfg = load_ray_config(
        models=[{"path": model_dir}],
        autoscaling={"max_replicas": 4, "predictive": {"service_time_s": 0.1}},
    )
    doc = serve_run_config(cfg)
    auto = doc["applications"][0]["deployments"][0]["autoscaling_config"]
    assert auto["policy"]["policy_function"] == "modelkiln.deploy.ray_policy:PredictivePolicy"
    parsed = schema.ServeDeploySchema.model_validate(doc)
    policy = parsed.applications[0].deployments[0].autoscaling_config["policy"]
    assert policy["policy_kwargs"]["service_time_s"] == 0.1
    with pytest.raises(ConfigError, match="predictive.p95_target_s=0.1 must exceed"):
        load_ray_config(models=[{"path": model_dir}],
                        autoscaling={"predictive": {"p95_target_s": 0.1}})  # fmt: skip


def _ctx(ongoing: float, now: float, state: dict[str, Any], high: int = 10) -> Any:
    return SimpleNamespace(
        total_num_requests=ongoing, current_time=now, policy_state=state,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=high,
    )  # fmt: skip


def test_predictive_policy_sizes_for_the_rate_now_and_clamps() -> None:
    policy = PredictivePolicy(service_time_s=0.5, slots_per_replica=2, p95_target_s=2.0,
                              sample_s=1.0, season=4, horizon=2)  # fmt: skip
    idle, state = policy(_ctx(0, 0.0, {}))
    assert idle == 1  # the deployment's minimum
    busy, state = policy(_ctx(20, 0.5, state))  # 20 ongoing / 0.5 s = 40 req/s
    assert busy == 10  # 40 req/s needs > 10 replicas of 2 slots: clamped to max
    assert policy(_ctx(4, 0.6, state, high=100))[0] > 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # statsmodels: a perfect fit's log(0)
def test_predictive_policy_scales_ahead_of_a_seasonal_peak() -> None:
    policy = PredictivePolicy(service_time_s=0.5, slots_per_replica=2, p95_target_s=2.0,
                              sample_s=1.0, season=4, horizon=4)  # fmt: skip
    state: dict[str, Any] = {}
    pattern = [1, 1, 1, 12]  # ongoing requests per sample: a peak every 4th sample
    now = 0.0
    for _ in range(4):  # 4 seasons of history, one tick closing each sample
        for ongoing in pattern:
            _, state = policy(_ctx(ongoing, now, state, high=100))
            now += 1.0
    ahead, state = policy(_ctx(1, now, state, high=100))  # quiet now, the peak is next
    reactive = policy.model.replicas(1 / 0.5)
    assert state["kiln_forecast_rate"] > 2 and ahead > reactive


def test_cli_reads_a_config_file_and_flags_win(model_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "ray.yaml"
    cfg.write_text(f"models: [{{path: {model_dir}}}]\nnum_replicas: 3\nport: 9001\n")
    code, output = _cli([str(tmp_path / "out"), "--config", str(cfg), "--port", "9002"])
    assert code == 0, output
    doc = yaml.safe_load((tmp_path / "out" / "serve_config.yaml").read_text())
    assert doc["http_options"]["port"] == 9002
    assert doc["applications"][0]["deployments"][0]["num_replicas"] == 3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # statsmodels on a short noisy history
def test_predictive_policy_adds_its_own_forecast_error_and_may_drop_the_floor() -> None:
    kwargs = {"service_time_s": 0.5, "slots_per_replica": 2, "p95_target_s": 2.0,
              "sample_s": 1.0, "season": 4, "horizon": 1}  # fmt: skip
    plain, headroom = PredictivePolicy(**kwargs), PredictivePolicy(**kwargs, z=2.0)
    s1: dict[str, Any] = {}
    s2: dict[str, Any] = {}
    now = 0.0
    for ongoing in [1, 6, 2, 9, 1, 7, 3, 8, 2, 6, 1, 9, 2, 7]:  # noisy: forecasts miss
        a, s1 = plain(_ctx(ongoing, now, s1, high=100))
        b, s2 = headroom(_ctx(ongoing, now, s2, high=100))
        now += 1.0
    assert s2["kiln_errors"] and "kiln_errors" not in s1
    assert b >= a
    assert any(e != 0 for e in s2["kiln_errors"])
    no_floor = PredictivePolicy(**kwargs, floor=False)
    assert no_floor(_ctx(40, 0.0, {}, high=100))[0] == 1  # no history yet: only the minimum
