"""The self-test renders with the image's sampling recipe: on an imported tiny LightX2V
checkpoint with the 4-step recipe, 4 transformer forwards, no CFG, 2 per expert."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from producer_fixtures import write_lightx2v

from gpubake.provisioning.importers.convert import import_checkpoint

FOUR = "lightx2v-4step-t2v"


@pytest.fixture(scope="module")
def lx_imported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lx")
    src = write_lightx2v(tiny_checkpoint, root / "src")
    import_checkpoint(src, root / "imported", "lightx2v", base=tiny_checkpoint, model_id="tiny-wan2.2", progress=False)
    return root / "imported"


def _with_recipe(facts: Any, recipe: str | None) -> Any:
    return facts.model_copy(update={"model": facts.model.model_copy(update={"recipe": recipe})})


class CountingLoader:
    """The weight loader the self-test would use, with a hook counting each expert's forwards."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: Path, device: str) -> Any:
        from gpubake.provisioning.loader import load_pipeline

        pipe = load_pipeline(path, device, require_manifest=True)
        for name in ("transformer", "transformer_2"):
            getattr(pipe, name).register_forward_pre_hook(lambda m, a, n=name: self.calls.append(n))
        return pipe


def test_selftest_of_an_imported_lightx2v_checkpoint_uses_the_4step_recipe(run_selftest, demo_spec, no_gpu,
                                                                           lx_imported, tmp_path):
    # a table whose tiny clip says 2 steps: a fixed schedule runs its own 4
    data = json.loads((Path(__file__).parents[2] / "src/gpubake/smoke_tests/data/throughput.json").read_text())
    data["models"]["tiny-wan2.2"]["render"]["steps"] = 2
    table = tmp_path / "table.json"
    table.write_text(json.dumps(data))
    loader = CountingLoader()
    report = run_selftest(_with_recipe(demo_spec, FOUR), no_gpu, model_dir=lx_imported, pipeline_loader=loader,
                          table_path=table)
    assert report.verdict == "pass", report.summary
    render = next(s for s in report.stages if s.name == "render")
    assert render.values["recipe"]["name"] == FOUR and render.values["params"]["steps"] == 4
    assert render.values["runs"][0]["recipe"] == FOUR and render.values["runs"][0]["steps"] == 4
    assert "4 steps (lightx2v-4step-t2v)" in render.message
    assert loader.calls == ["transformer", "transformer", "transformer_2", "transformer_2"]  # CPU: no warm-up


def test_the_images_own_recipe_when_its_facts_name_none(run_selftest, demo_spec, no_gpu, lx_imported):
    loader = CountingLoader()
    report = run_selftest(_with_recipe(demo_spec, None), no_gpu, model_dir=lx_imported, pipeline_loader=loader)
    assert report.verdict == "pass", report.summary
    render = next(s for s in report.stages if s.name == "render")
    assert render.values["recipe"]["name"] == "tiny-4step" and render.values["recipe"]["cfg"]
    assert len(loader.calls) == 2 * render.values["params"]["steps"]  # CFG: two forwards a step


def test_an_unknown_recipe_in_the_facts_fails_the_render_stage_in_one_line(run_selftest, demo_spec, no_gpu,
                                                                          tiny_nvfp4_checkpoint):
    report = run_selftest(_with_recipe(demo_spec, "no-such-recipe"), no_gpu, model_dir=tiny_nvfp4_checkpoint)
    render = next(s for s in report.stages if s.name == "render")
    assert render.status == "fail" and "unknown sampling recipe 'no-such-recipe'" in render.message
    assert "\n" not in render.message


def test_the_4step_rows_are_estimates_at_one_forward_a_step():
    from gpubake.provisioning.models import get_model
    from gpubake.smoke_tests.expectations import load_table

    table = load_table()
    four, cfg = table.models["wan2.2-t2v-a14b-lightx2v-4step"], table.models["wan2.2-t2v-a14b"]
    assert four.render.steps == get_model("wan2.2-t2v-a14b-lightx2v-4step").recipe.steps == 4
    assert four.render.model_copy(update={"steps": 4}) == cfg.render.model_copy(update={"steps": 4})
    assert [r.name for r in four.gpus] == [r.name for r in cfg.gpus]
    for row, base in zip(four.gpus, cfg.gpus):
        assert row.source == "estimate" and row.match == base.match and "one forward a step" in row.basis
        assert row.seconds_per_step == pytest.approx(base.seconds_per_step / 2, rel=0.02)
        saved = cfg.render.steps * (base.seconds_per_step - row.seconds_per_step)
        assert row.end_to_end_seconds == pytest.approx(base.end_to_end_seconds - saved, abs=0.06)
