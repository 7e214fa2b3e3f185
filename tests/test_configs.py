"""Every file of the config tree composes and instantiates."""

import pytest
from hydra.utils import instantiate

from fewstep.cli import CONF_DIR, group_choices

from helpers import REPO

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def test_config_groups_exist():
    for group in ["method", "model", "data", "sampler", "trainer", "logger", "callbacks", "experiment", "hparams_search"]:
        assert group in GROUPS and group_choices(group), group


@pytest.mark.parametrize("choice", group_choices("data"))
def test_data_configs_instantiate(compose_cfg, choice, tmp_path):
    overrides = [f"data={choice}"]
    if choice == "image_folder":  # needs a folder to count its classes
        from PIL import Image

        for name in ("cats", "dogs"):
            (tmp_path / "images" / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / name / "a.png")
        overrides.append(f"data.root={tmp_path / 'images'}")
    if choice == "edm_zip":  # needs a folder (or zip) of images, as EDM's dataset_tool.py writes it
        from PIL import Image

        (tmp_path / "edm" / "00000").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "edm" / "00000" / "img00000000.png")
        (tmp_path / "edm" / "dataset.json").write_text('{"labels": [["00000/img00000000.png", 1]]}')
        overrides.append(f"data.path={tmp_path / 'edm'}")
    cfg = compose_cfg("train", overrides)
    datamodule = instantiate(cfg.data)
    # shape and class count are known before any file is read
    assert len(datamodule.shape) in (1, 3) and datamodule.num_classes >= 1


@pytest.mark.parametrize("model", group_choices("model"))
@pytest.mark.parametrize("method", group_choices("method"))
def test_method_and_model_configs_instantiate(compose_cfg, method, model):
    import inspect
    from types import SimpleNamespace

    from hydra.utils import get_class

    from fewstep.distill import options, with_ddil
    from fewstep.methods.student import DistilledStudent
    from fewstep.methods.teacher import Staged

    data = "gmm" if model == "mlp" else "digits"
    small = ["model.model_channels=8", "model.num_blocks=1"] if model.startswith("edm") else []  # EDM's 56M-296M, EDM2's to 1.1B
    small += ["model.channels_per_head=8"] if model.startswith("edm2_") else []
    overrides = [f"method={method}", f"model={model}", f"data={data}", "method.conditional=true", *small]
    configs = [compose_cfg("train", overrides)]
    if issubclass(get_class(configs[0].method._target_), DistilledStudent):  # and with DDIL, a switch on any student
        configs.append(with_ddil(compose_cfg("train", [*overrides, "ddil=default"])))
    for cfg in configs:
        datamodule = instantiate(cfg.data)
        cls, arguments = get_class(cfg.method._target_), options(cfg)
        if issubclass(cls, Staged):  # a staged method: its first stage's student, from a teacher of its settings
            teacher_steps, steps = cls.stage_steps(arguments)[:2]
            defaults = {name: p.default for name, p in inspect.signature(cls.teacher_kind.__init__).parameters.items()
                        if p.default is not inspect.Parameter.empty}
            teacher = SimpleNamespace(hparams={**defaults, **arguments})
            arguments = {"_target_": arguments["_target_"], "_recursive_": False,
                         **cls.stage_options(arguments, teacher, "teacher.ckpt", teacher_steps, steps, None)}
        if method == "meanflow" and model.startswith("edm2_"):  # EDM2's network has no second time input
            with pytest.raises(Exception, match="meanflow needs a network with a second time input"):
                instantiate(arguments, net=cfg.model, data_shape=datamodule.shape, num_classes=datamodule.num_classes)
            continue
        built = instantiate(arguments, net=cfg.model, data_shape=datamodule.shape, num_classes=datamodule.num_classes)
        assert built.num_classes == datamodule.num_classes
        assert sum(p.numel() for p in built.parameters()) > 0
        assert (built.hparams.get("ddil") is not None) == (cfg.get("ddil") is not None)


@pytest.mark.parametrize("trainer", group_choices("trainer"))
def test_trainer_logger_callback_configs_instantiate(compose_cfg, trainer):
    cfg = compose_cfg("train", [f"trainer={trainer}", "logger=csv"])
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    if trainer in ("gpu", "ddp", "fsdp"):
        # No GPU here: check the config, not the hardware.
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        return
    built = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert built.max_steps > 0


def test_debug_profile_has_no_checkpoints(compose_cfg):
    cfg = compose_cfg("train", ["trainer=debug"])
    assert cfg.callbacks.model_checkpoint is None and cfg.trainer.enable_checkpointing is False


@pytest.mark.parametrize("experiment", group_choices("experiment"))
def test_experiments_compose(compose_cfg, experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    assert cfg.method._target_.startswith("fewstep.methods.")


@pytest.mark.parametrize("search", group_choices("hparams_search"))
def test_hparams_search_sweeps_existing_keys(compose_cfg, search):
    from omegaconf import OmegaConf

    # eval_* sweeps run over fewstep.evaluate's config, the others over fewstep.train's
    entry = "evaluate" if search.startswith("eval_") else "train"
    cfg = compose_cfg(entry, [f"hparams_search={search}", "ckpt=x"] if entry == "evaluate" else [f"hparams_search={search}"])
    sweep = OmegaConf.load(CONF_DIR / "hparams_search" / f"{search}.yaml").hydra.sweeper.params
    for key in sweep:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key


@pytest.mark.parametrize("sampler", group_choices("sampler"))
def test_sampler_configs_name_a_solver(compose_cfg, sampler):
    from fewstep.samplers import KAC_SOLVERS, SOLVERS

    cfg = compose_cfg("sample", [f"sampler={sampler}", "ckpt=x"])
    assert cfg.sampler.name in SOLVERS or cfg.sampler.name in KAC_SOLVERS


@pytest.mark.slow
def test_the_wheel_carries_the_whole_config_tree(tmp_path):
    # conf/ sits at the repository root; a non-editable install must still find it inside the package
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy, so that no stale build/ of the working tree takes part
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "build", "outputs", "*.egg-info", "__pycache__", ".pytest_cache"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("fewstep-*.whl")
    packed = {name.removeprefix("fewstep/conf/") for name in zipfile.ZipFile(wheel).namelist() if name.startswith("fewstep/conf/")}
    tree = {str(path.relative_to(REPO / "conf")) for path in (REPO / "conf").rglob("*.yaml")}
    assert tree and packed == tree


def test_code_comments_and_configs_name_no_issue_numbers():
    # what a number refers to is in docs/ and the history, never in the code a reader opens
    import re

    pattern = re.compile(r"\bissue \d+", re.IGNORECASE)
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("fewstep", "conf", "tests")
        for path in sorted((REPO / folder).rglob("*"))
        if path.suffix in (".py", ".yaml") and path.is_file() and not path.is_symlink()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not found, found
