"""Bad data through the user's path: `train(cfg)` composed like `python train.py` (or the
DataModule it sets up) on tiny folders in tmp_path. Each case ends in one LungsegError paragraph
that names the file (or setting) and the fix, in a warning and a skip with data.strict=false,
or in a run that works. Settings of a wrong type or range are refused by check_settings,
which train() runs before it builds or writes anything; they are tested on the composed config.

Function-level cases live beside their functions: tests/test_folders.py (pairing, reading),
test_masks.py (decoding), test_splits.py (fractions, patterns, split files) and
test_datamodule.py (settings)."""

import csv
import logging
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_inference import write_pairs

import lungseg.errors
from lungseg.checks import check_settings, check_top_keys
from lungseg.cli_hints import hint_on_override_error, override_hint
from lungseg.data.datamodule import SegDataModule
from lungseg.data.folders import check_data_dirs, read_image, write_image
from lungseg.errors import LungsegError, user_error
from lungseg.evaluate import evaluate
from lungseg.export import export
from lungseg.predict import predict
from lungseg.train import train

SIZES = [(24, 28)] * 6  # 6 pairs split 4/1/1


def folders(make_cfg, image_dir, mask_dir, *overrides):
    # Quoted: Hydra's override grammar ends an unquoted value at a space.
    return make_cfg(
        f"data.image_dir='{image_dir}'",
        f"data.mask_dir='{mask_dir}'",
        "data.mask_mode=index",
        *overrides,
    )


def error_of(cfg) -> str:
    """The message `python train.py` would print for cfg (Hydra's instantiate wraps errors
    raised in constructors, the entry point unwraps them)."""
    with pytest.raises(Exception) as info:
        train(cfg)
    error = user_error(info.value)
    assert error is not None, f"not a LungsegError: {info.value!r}"
    message = str(error)
    assert "\n\n" not in message and "Traceback" not in message
    return message


def setup(image_dir, mask_dir, **kwargs) -> SegDataModule:
    dm = SegDataModule(str(image_dir), str(mask_dir), mask_mode="index", image_size=16, **kwargs)
    dm.setup("fit")
    return dm


def counts(dm: SegDataModule) -> tuple[int, int, int]:
    return len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.batch_size=0",
            r"data.batch_size is 0; give a whole number of images per batch, 1 or more "
            r"\(e.g. data.batch_size=8\).$",
        ),
        ("data.batch_size=true", "data.batch_size is true; give a whole number"),
        ("data.batch_size=2.5", "data.batch_size is 2.5; give a whole number"),
        ("data.image_size=[32,0]", r"data.image_size is \[32, 0\]; give the network's input"),
        ("data.image_size=true", "data.image_size is true; give the network's input size"),
        ("data.num_workers=-1", "data.num_workers is -1; give a whole number of DataLoader"),
        ("data.num_workers=abc", "data.num_workers is 'abc'"),
        ("data.demo_num_images=abc", "data.demo_num_images is 'abc'"),
        ("model.width=abc", "model.width is 'abc'; give a whole number of channels"),
        ("model.depth=0", "model.depth is 0; give a whole number of down-sampling stages"),
        ("model.dropout=1.0", "model.dropout is 1.0; give a dropout probability"),
        ("trainer.max_epochs=abc", "trainer.max_epochs is 'abc'; give a whole number of epochs"),
        ("trainer.max_epochs=-2", "trainer.max_epochs is -2"),
        ("trainer.max_epochs=0", "trainer.max_epochs is 0; give a whole number of epochs, 1 or"),
        ("trainer.max_epochs=true", "trainer.max_epochs is true"),
        ("trainer.max_steps=abc", "trainer.max_steps is 'abc'"),
        ("trainer.num_sanity_val_steps=abc", "trainer.num_sanity_val_steps is 'abc'"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps is 0; give a whole number"),
        ("trainer.log_every_n_steps=null", "trainer.log_every_n_steps is null"),
        ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches is 1.5"),
        ("trainer.max_time=abc", "trainer.max_time is 'abc'; give a duration \"DD:HH:MM:SS\""),
        # Lightning's Timer wants two digits for hours, minutes and seconds
        ("trainer.max_time=0:0:15:0", "trainer.max_time is '0:0:15:0'; give a duration"),
        ("trainer.max_time={hour:1}", "trainer.max_time is {'hour': 1}; give a duration"),
        ("callbacks.time_plan.margin=1.5", "callbacks.time_plan.margin is 1.5; give the share"),
        ("callbacks.time_plan.enabled=2", "callbacks.time_plan.enabled is 2; give true"),
        ("test_postprocessed=1", "test_postprocessed is 1; give true or false"),
        ("trainer.precision=abc", "trainer.precision is 'abc'; give one of .*bf16-mixed"),
        ("trainer.devices=0", "trainer.devices is 0"),
        ("optimizer.lr=0", "optimizer.lr is 0; give a learning rate, a number above 0"),
        ("optimizer.lr=abc", "optimizer.lr is 'abc'"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay is -1"),
        ("seed=abc", "seed is 'abc'"),
        # the cosine schedule's T_max follows max_epochs; null fails at its first step
        ("trainer.max_epochs=null", "scheduler.T_max is null.*scheduler=none"),
        # no epoch limit: T_max -1 swung the rate between lr and eta_min every epoch
        ("trainer.max_epochs=-1", "scheduler.T_max is -1; .* 1 or more.*scheduler=none"),
        ("postprocess.min_size=-5", "postprocess.min_size is -5"),
        ("postprocess.tta_flips=[diagonal]", r"postprocess.tta_flips \['diagonal'\] holds"),
        ("postprocess.tta_flips=horizontal", "postprocess.tta_flips 'horizontal' is not a list"),
    ],
)
def test_wrong_settings_are_refused_before_anything_is_built(make_cfg, override, message):
    # Left to Lightning, torch and Hydra, most of these were bare tracebacks, some after the
    # run folder already held config.yaml, split.csv and environment.json.
    with pytest.raises(LungsegError, match=message):
        check_settings(make_cfg(override))


@pytest.mark.parametrize(
    ("loss", "override", "message"),
    [
        # torch's "label_smoothing must be between 0.0 and 1.0" came at the first step
        ("ce", "loss.label_smoothing=1.5", r"loss.label_smoothing is 1.5; give a label smooth"),
        ("ce", "loss.label_smoothing=-0.1", "loss.label_smoothing is -0.1"),
        ("focal", "loss.gamma=-1", "loss.gamma is -1; give the focal loss's focusing exponent"),
        ("dice", "loss.smooth=-1", "loss.smooth is -1; give the Dice or Tversky loss's smooth"),
        ("tversky", "loss.alpha=-0.3", "loss.alpha is -0.3; give the Tversky loss's weight"),
        ("tversky", "loss.beta=abc", "loss.beta is 'abc'"),
        ("dice_ce", "loss.ce_weight=-1", "loss.ce_weight is -1; give the weight of the cross"),
        ("dice_ce", "loss.class_weights=[1,abc,2]", r"loss.class_weights is \[1, 'abc', 2\]"),
        ("ce", "loss.class_weights=[0,0,0]", "loss.class_weights is .*not all 0"),
        ("focal", "loss.class_weights=[1,-1,1]", "loss.class_weights is .*a number 0 or more"),
        ("ce", "loss.class_weights=2", "loss.class_weights is 2; give a list of one weight"),
        ("dice", "loss.per_image=2", "loss.per_image is 2; give true or false"),
    ],
)
def test_wrong_loss_settings_are_refused_before_anything_is_built(
    make_cfg, loss, override, message
):
    with pytest.raises(LungsegError, match=message):
        check_settings(make_cfg(f"loss={loss}", override))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Hydra's "Key 'imagesize' is not in struct" advises the +; then the constructor's
        # "unexpected keyword argument 'imagesize'" came after the run folder was made.
        (
            ["+data.imagesize=64"],
            r"^data.imagesize is not a setting of data \(lungseg.data.datamodule.SegDataModule\); "
            r"did you mean data.image_size\? Remove \+data.imagesize, or see conf/data/",
        ),
        (["+model.widht=8"], r"^model.widht is not a setting of model \(lungseg.models.unet.UN"),
        (["+model.widht=8"], r"\); did you mean model.width\? Remove \+model.widht, or see conf"),
        # nothing close: no guess, only where the settings are
        (["+model.foo=1"], r"^model.foo is not a setting of model \(.*UNet\)\. Remove \+model.foo"),
        # a U-Net setting on another network
        (
            ["model=deeplab", "+model.depth=4"],
            r"model.depth .* \(lungseg.models.deeplab.DeepLab\)\. ",
        ),
        (["loss=focal", "+loss.gama=2"], r"^loss.gama is not .*; did you mean loss.gamma\?"),
        (["+optimizer.weight_deacy=0"], r"did you mean optimizer.weight_decay\?"),
        (["optimizer=sgd", "+optimizer.nesterow=true"], r"did you mean optimizer.nesterov\?"),
        (["+scheduler.etamin=0"], r"^scheduler.etamin is not a setting of scheduler \(torch.optim"),
        (["+scheduler.etamin=0"], r"did you mean scheduler.eta_min\?"),
        # Lightning's, but lungseg takes out only monitor and interval before building it
        (["+scheduler.frequency=2"], r"^scheduler.frequency is not a setting of scheduler"),
        # lungseg passes the augmentation group in its place
        (["+data.augmentation=null"], r"^data.augmentation is not a setting of data"),
        # Lightning's Trainer: was a TypeError traceback after the run folder was written
        (
            ["+trainer.max_epoch=1"],
            r"^trainer.max_epoch is not a setting of trainer \(pytorch_lightning.Trainer\); "
            r"did you mean trainer.max_epochs or trainer.min_epochs\? Remove \+trainer.max_epoch",
        ),
        (["+trainer.callbacks=[]"], r"^trainer.callbacks is not a setting of trainer"),
        # a callback's: was a TypeError after the run folder was written (found by a tester)
        (
            ["+callbacks.early_stopping.patiense=2"],
            r"^callbacks.early_stopping.patiense is not a setting of callbacks.early_stopping "
            r"\(.*EarlyStopping\); did you mean callbacks.early_stopping.patience\?",
        ),
    ],
)
def test_unknown_settings_are_refused_with_the_nearest_name(make_cfg, overrides, message):
    with pytest.raises(LungsegError, match=message):
        check_settings(make_cfg(*overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Hydra adds a top-level key after a +, and nothing read it: seed stayed 42.
        (
            ["+sed=1"],
            r"^sed is not a setting of train.py; did you mean seed\? Remove \+sed, or "
            r"see conf/config.yaml for the settings\.$",
        ),
        # a group's setting without its group
        (["+max_epochs=5"], r"^max_epochs is not .*; did you mean trainer.max_epochs\? Remove"),
        (["+min_size=4"], r"did you mean postprocess.min_size\?"),
        (["+foo=1"], r"^foo is not a setting of train.py\. Remove \+foo, or see conf/"),
    ],
)
def test_unknown_top_level_settings_are_refused_with_the_nearest_name(make_cfg, overrides, message):
    with pytest.raises(LungsegError, match=message):
        check_settings(make_cfg(*overrides))


def test_an_experiment_without_the_global_package_is_refused(tmp_path):
    """Without '# @package _global_' Hydra puts an experiment's settings under experiment.*,
    where nothing reads them."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "experiment" / "mine.yaml").write_text("trainer:\n  max_epochs: 2\n")
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "experiment=mine"])
    with pytest.raises(LungsegError, match=r"^experiment is not .* '# @package _global_'"):
        check_settings(cfg)


def test_top_level_settings_of_the_config_and_hydra_pass(tmp_path):
    """A key the config has, set with ++ (add or override), and the hydra node that
    compose(return_hydra_config=True) keeps, pass."""
    overrides = [f"output_dir={tmp_path}", "++seed=7", "++compile=true", "ckpt_path=null"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    check_settings(cfg)


def composed(config: str, *overrides: str, hydra: bool = False):
    """conf/<config>.yaml composed as its script composes it (with Hydra's node: hydra=True)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config, overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize(
    ("run", "config", "overrides", "message"),
    [
        # each was ignored: the run went on without the setting the user asked for
        (
            predict,
            "predict",
            ["+treshold=0.3"],
            r"^treshold is not a setting of predict.py; did you mean postprocess.threshold\? "
            r"Remove \+treshold, or see conf/predict.yaml for the settings\.$",
        ),
        (
            predict,
            "predict",
            ["+postprocess.treshold=0.3"],
            r"^postprocess.treshold is not a setting of predict.py; did you mean "
            r"postprocess.threshold\? Remove \+postprocess.treshold, or see conf/predict.yaml",
        ),
        (predict, "predict", ["+ttaflips=[vertical]"], r"^ttaflips .*; did you mean tta_flips\?"),
        (
            evaluate,
            "eval",
            ["+treshold=0.3"],
            r"^treshold is not a setting of eval.py; did you mean postprocess.threshold\? "
            r"Remove \+treshold, or see conf/eval.yaml for the settings\.$",
        ),
        (evaluate, "eval", ["+data.imagedir=x"], r"^data.imagedir .*did you mean data.image_dir\?"),
        (evaluate, "eval", ["+foo=1"], r"^foo is not a setting of eval.py\. Remove \+foo, or"),
        (
            export,
            "export",
            ["+opest=17"],
            r"^opest is not a setting of export.py; did you mean opset\? Remove \+opest, or see "
            r"conf/export.yaml for the settings\.$",
        ),
    ],
)
def test_unknown_settings_of_eval_predict_and_export_are_refused_first(
    tmp_path, run, config, overrides, message
):
    """Refused before the checkpoint (which does not exist here) is read or anything written."""
    out = tmp_path / "out"
    paths = {
        "predict": [f"input_dir={tmp_path}", f"output_dir={out}"],
        "eval": [f"output_dir={out}"],
        "export": [f"output={out / 'model.onnx'}"],
    }[config]
    cfg = composed(config, f"ckpt_path={tmp_path / 'missing.ckpt'}", *paths, *overrides)
    with pytest.raises(LungsegError, match=message):
        run(cfg)
    assert not out.exists()


@pytest.mark.parametrize(
    ("script", "config", "overrides"),
    [
        (
            "eval.py",
            "eval",
            ["++tta=true", "postprocess.threshold=0.4", "data.palette={a:[1,2,3]}"],
        ),
        (
            "predict.py",
            "predict",
            ["++postprocess.min_size=4", "recursive=true", "mask_suffixes=[]"],
        ),
        ("export.py", "export", ["format=pt2", "++opset=17"]),
        ("train.py", "config", ["experiment=lung_ct", "model=fcn", "++seed=7"]),
    ],
)
def test_settings_of_each_script_pass_the_key_check(script, config, overrides):
    """The keys of each script's config (with Hydra's node, which compose keeps) pass."""
    check_top_keys(composed(config, *overrides, hydra=True), script)


def test_the_config_train_scores_its_test_split_with_passes_the_key_check():
    from lungseg.evaluate import test_config  # a function, not a test

    check_top_keys(OmegaConf.merge(test_config("a.ckpt", "out"), {"device": "cpu"}), "eval.py")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # model.depth is set by conf/experiment/article.yaml, not typed: "Remove +model.depth"
        # sent the user looking for a + they never typed
        (
            ["experiment=article", "model=fcn"],
            r"^model.depth is not a setting of model \(lungseg.models.fcn.FCN\)\. It comes from "
            r"conf/experiment/article.yaml: experiment=article is made for model=unet, and "
            r"model=fcn does not take model.depth\.",
        ),
        # typed on the command line: the + is the user's
        (["model=fcn", "+model.depth=4"], r"^model.depth .*\. Remove \+model.depth, or see"),
    ],
)
def test_a_key_from_an_experiment_file_names_the_file(overrides, message):
    with pytest.raises(LungsegError, match=message):
        check_settings(composed("config", *overrides, hydra=True))


def test_constructors_that_take_any_keyword_are_not_checked(make_cfg):
    check_settings(make_cfg("model._target_=torch.nn.Identity", "+model.anything=1"))
    # lungseg's own trainer settings, and Lightning's that the config does not list, pass
    check_settings(make_cfg("trainer.gpus=0", "+trainer.enable_model_summary=false"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=0"], "data.batch_size is 0"),
        (["loss=ce", "loss.label_smoothing=1.5"], "loss.label_smoothing is 1.5"),
        (["+data.imagesize=64"], "did you mean data.image_size"),
        (["+sed=1"], "did you mean seed"),
    ],
)
def test_train_checks_its_settings_before_it_writes(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(LungsegError, match=message):
        train(cfg)
    assert not Path(cfg.output_dir).exists()


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        # every option of the groups whose keys are checked against their constructors
        *[
            [f"{group}={option.stem}"]
            for group in ("model", "loss", "optimizer", "scheduler")
            for option in sorted((ROOT / "conf" / group).glob("*.yaml"))
        ],
        *[[f"trainer={t}"] for t in ("cpu", "ddp", "gpu")],
        *[[f"experiment={e}"] for e in ("article", "lidc_nodules", "lung_ct")],
        *[["experiment=lung_ct", f"model={m}"] for m in ("fcn", "deeplab")],
        ["hparams_search=optuna"],
        ["trainer.max_epochs=-1", "trainer.max_steps=10", "trainer.limit_val_batches=0"]
        + ["scheduler=none"],
        ["trainer.max_time=00:00:15:00", "trainer.devices=[0,1]", "trainer.precision=16"],
        ["data.image_size=[32,48]", "trainer.limit_train_batches=3", "optimizer.lr=1"],
        # Lightning's own defaults and forms it parses
        [
            "trainer.precision=null",
            "trainer.num_sanity_val_steps=null",
            "trainer.max_time=0:00:15:00",
        ],
        ["trainer.max_time={hours:1,minutes:30}"],
    ],
)
def test_shipped_configs_pass_the_settings_check(tmp_path, overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", *overrides])
    check_settings(cfg)


@pytest.mark.parametrize(
    ("override", "fix"),
    [
        ("resume=no", "resume=false"),  # was: continued the run in hydra.run.dir
        ("compile=off", "compile=false"),  # was: compiled the network
        ("test_after_fit=no", "test_after_fit=false"),
        ("data.strict=Off", "data.strict=false"),  # was: strict
        ("data.soft_masks=yes", "data.soft_masks=true"),
        ("callbacks.ema.enabled=on", "callbacks.ema.enabled=true"),
        ("data.recursive='false'", "data.recursive=false"),
    ],
)
def test_on_off_words_hydra_keeps_as_text_are_refused(make_cfg, override, fix):
    """Hydra reads only true and false as booleans; 'no' is text, and text is true."""
    with pytest.raises(LungsegError, match=rf"is '.*', which Hydra keeps as text.* Give {fix} "):
        check_settings(make_cfg(override))


def test_names_in_lists_may_be_on_off_words(make_cfg):
    check_settings(make_cfg("data.class_names=[background,no,yes]"))


def test_missing_data_folder_is_reported_before_the_palette(make_cfg, tmp_path):
    # data.mask_mode=palette (the default) needs data.palette for your own data; a wrong path
    # was reported as that missing palette.
    cfg = make_cfg("data.image_dir=/nonexist", "data.mask_dir=/nonexist2")
    with pytest.raises(LungsegError, match="The image folder /nonexist does not exist. Set data"):
        check_settings(cfg)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks.png").write_bytes(b"")
    with pytest.raises(LungsegError, match="mask folder .*masks.png is not a folder. Set data.m"):
        check_data_dirs(tmp_path / "images", tmp_path / "masks.png")
    check_data_dirs(None, None)  # the demo data


def test_a_folder_of_volumes_is_named_before_the_palette(make_cfg, tmp_path):
    """DICOM or NIfTI folders with the default mask mode (palette) got the missing-palette
    error first; the one that says to export slices came only once the mode was set (found
    by a tester)."""
    for name, files in (("images", ["a.dcm", "b.dcm"]), ("masks", ["a.nii.gz", "b.nii.gz"])):
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_bytes(b"x")
    cfg_args = [f"data.image_dir={tmp_path / 'images'}", f"data.mask_dir={tmp_path / 'masks'}"]
    cfg = make_cfg(*cfg_args)
    with pytest.raises(LungsegError, match=r"holds no image files \(it holds 2 .dcm files: lungs"):
        check_settings(cfg)
    # DICOM files named by UID, told by their content (review)
    for path in (tmp_path / "images").iterdir():
        path.rename(path.with_name(f"1.2.840.{path.stem}"))
        path.with_name(f"1.2.840.{path.stem}").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(LungsegError, match=r"holds no image files \(it holds 2 DICOM files: lu"):
        check_settings(cfg)
    # with data.recursive the slices may lie in sub-folders beside the volumes (review)
    (tmp_path / "images" / "p1").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "p1" / "a.png"), np.zeros((8, 8), np.uint8))
    check_settings(make_cfg(*cfg_args, "data.recursive=true", "data.mask_mode=index"))


def test_empty_folders(make_cfg, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    message = error_of(folders(make_cfg, tmp_path / "images", tmp_path / "masks"))
    assert str(tmp_path / "images") in message and "holds no image files" in message
    assert "Point data.image_dir at the folder" in message


def test_image_without_mask_and_mask_without_image(make_cfg, tmp_path, caplog):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    (image_dir / "img5.png").rename(image_dir / "lonely image.png")
    message = error_of(folders(make_cfg, image_dir, mask_dir))
    assert "'lonely image.png'" in message and "'img5.png'" in message
    assert "1 image without a mask" in message and "1 mask without an image" in message
    assert "data.strict=false" in message
    with caplog.at_level(logging.WARNING):
        dm = setup(image_dir, mask_dir, strict=False)
    assert re.search("Skipping unpaired files.*lonely image.png", caplog.text)
    assert sum(counts(dm)) == 5


def test_a_run_folder_in_a_data_folder_is_refused(make_cfg, tmp_path):
    """hydra.run.dir=<the image folder> wrote checkpoints/, curves.png and split.csv among the
    images, and every later run on them stopped at 'curves.png: image without a mask' (found
    by a tester); below a data folder only where data.recursive searches it."""
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    before = sorted(p.name for p in image_dir.iterdir())
    recursive = ["data.recursive=true"]
    for run, extra in [(image_dir, []), (mask_dir, []), (mask_dir / "run", recursive)]:
        message = error_of(folders(make_cfg, image_dir, mask_dir, f"output_dir={run}", *extra))
        assert message.startswith(f"The run folder {run} ")
        assert "outside the data folders" in message
    assert sorted(p.name for p in image_dir.iterdir()) == before
    assert not (mask_dir / "run").exists()


def test_eval_scores_a_run_that_skipped_a_corrupt_pair(make_cfg, tmp_path, caplog):
    """eval.py on the test split of a data.strict=false run: the pair the run left out is
    not in its split.csv and is left out again (it stopped eval with 'does not list')."""
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    (image_dir / "img3.png").write_bytes(b"")
    cfg = folders(make_cfg, image_dir, mask_dir, "data.strict=false", "data.split=[0.5,0.2,0.3]")
    with caplog.at_level(logging.WARNING):
        checkpoint = train(cfg)["best_checkpoint"]
    assert "Skipping 1 of 6" in caplog.text
    with (Path(cfg.output_dir) / "skipped.csv").open() as f:
        skipped = list(csv.DictReader(f))
    assert [row["file"] for row in skipped] == [str(image_dir / "img3.png")]
    assert "could not be decoded as an image (the file is empty)" in skipped[0]["reason"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        eval_cfg = compose(
            "eval",
            overrides=[f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'eval'}"]
            + ["progress_bar=false"],
        )
    summary = evaluate(eval_cfg)
    with (tmp_path / "eval" / "per_image.csv").open() as f:
        scored = [row["image"] for row in csv.DictReader(f)]
    assert scored and "img3" not in scored and summary["images"].startswith("test split")


@pytest.mark.parametrize("content", ["zero-byte", "garbage", "truncated"])
def test_corrupt_or_truncated_image(make_cfg, tmp_path, content, caplog):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    path = image_dir / "img3.png"
    broken = {
        "zero-byte": b"",
        "garbage": b"GIF89a not really",
        "truncated": path.read_bytes()[:80],
    }
    path.write_bytes(broken[content])
    message = error_of(folders(make_cfg, image_dir, mask_dir))
    assert f"{path} could not be decoded as an image" in message
    assert "Re-export it or remove it" in message and "data.strict=false" in message
    with caplog.at_level(logging.WARNING):
        dm = setup(image_dir, mask_dir, strict=False)
    assert re.search(r"Skipping 1 of 6 image/mask pairs.*img3\.png", caplog.text)
    assert sum(counts(dm)) == 5 and "img3" not in dm.split


def test_the_strict_error_names_the_mask_of_a_pair_whose_mask_is_broken(make_cfg, tmp_path):
    """A corrupt image and, in another pair, a corrupt mask: the list of the other pairs that
    cannot be used names the mask (was: the pair's image alone, which sent a new-user tester
    to the image)."""
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    (image_dir / "img2.png").write_bytes(b"<html>not an image</html>")
    (mask_dir / "img4.png").write_bytes(b"<html>not an image</html>")
    message = error_of(folders(make_cfg, image_dir, mask_dir))
    assert f"{image_dir / 'img2.png'} could not be decoded as an image" in message
    assert "Other pairs that cannot be used: img4.png (its mask img4.png)." in message


def test_masks_without_a_background_pixel_are_named(tmp_path, caplog):
    """Two masks all foreground (saved blank white, or an empty slice's mask inverted): both
    are named (were trained without a word, found by a new-user tester); masks with
    background say nothing."""
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    with caplog.at_level(logging.WARNING):
        setup(image_dir, mask_dir)
    assert "no background pixel" not in caplog.text
    for name in ("img1.png", "img4.png"):
        mask = cv2.imread(str(mask_dir / name), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(mask_dir / name), np.full_like(mask, mask.max()))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        setup(image_dir, mask_dir)
    assert "2 masks of the 6 hold no background pixel: img1.png (all " in caplog.text
    assert "img4.png (all " in caplog.text and "saved inverted (0 and 1 swapped)" in caplog.text
    # a partial annotation: foreground and the ignore label, no background; no warning
    mask = cv2.imread(str(mask_dir / "img1.png"), cv2.IMREAD_UNCHANGED)
    mask[:4] = 255
    cv2.imwrite(str(mask_dir / "img1.png"), mask)
    cv2.imwrite(str(mask_dir / "img4.png"), np.zeros_like(mask))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        setup(image_dir, mask_dir, ignore_index=255)
    assert "no background pixel" not in caplog.text


def test_non_image_files_are_ignored(tmp_path):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    for folder in (image_dir, mask_dir):
        (folder / "notes.txt").write_text("not an image\n")
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (folder / "._img0.png").write_bytes(b"\0\5\26\7 AppleDouble")
        (folder / "sub.png").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert counts(setup(image_dir, mask_dir)) == (4, 1, 1)


def test_mask_size_differs_from_image(make_cfg, tmp_path):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    write_image(mask_dir / "img2.png", np.zeros((24, 30), np.uint8))
    message = error_of(folders(make_cfg, image_dir, mask_dir))
    assert str(mask_dir / "img2.png") in message and "28x24" in message and "30x24" in message
    assert "re-export the mask at the image's size" in message


@pytest.mark.parametrize("mode", ["index", "palette"])
def test_mask_values_outside_the_declared_classes(make_cfg, tmp_path, mode):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES, mode)
    mask = cv2.imread(str(mask_dir / "img4.png"), cv2.IMREAD_UNCHANGED)
    mask[:2, :2] = 7 if mode == "index" else (0, 128, 255)  # BGR orange
    cv2.imwrite(str(mask_dir / "img4.png"), mask)
    palette = "data.palette={background:[0,0,0],lung:[0,255,0],tumour:[255,0,0]}"
    extra = ["data.num_classes=3"] if mode == "index" else ["data.mask_mode=palette", palette]
    message = error_of(folders(make_cfg, image_dir, mask_dir, *extra))
    assert str(mask_dir / "img4.png") in message
    if mode == "index":
        assert "class ids 7" in message and "data.num_classes to at least 8" in message
    else:
        assert "(255, 128, 0): 4 pixels" in message and "Add them to data.palette" in message


def test_jpeg_masks_in_index_mode_are_refused(make_cfg, tmp_path):
    """JPEG noise along the edges was read as class ids (an extra class of 0.3 % pixels)."""
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    for path in sorted(mask_dir.glob("*.png")):
        cv2.imwrite(str(path.with_suffix(".JPG")), cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
        path.unlink()
    message = error_of(folders(make_cfg, image_dir, mask_dir))
    assert f"Mask {mask_dir / 'img0.JPG'} is a JPEG" in message
    assert "Save index masks as PNG" in message and "data.mask_mode=binary" in message


def png_grey_alpha(grey: np.ndarray, alpha: np.ndarray) -> bytes:
    """An 8-bit grey + alpha PNG (colour type 4), as image editors write; cv2 cannot."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    h, w = grey.shape
    rows = b"".join(b"\0" + row.tobytes() for row in np.dstack([grey, alpha]))
    header = struct.pack(">IIBBBBB", w, h, 8, 4, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_masks_drawn_in_the_alpha_channel_only_are_refused(make_cfg, tmp_path):
    """Black RGBA masks whose foreground is their opacity read as empty masks (foreground
    0.0 %, test Dice 0) when the alpha was dropped."""
    image_dir, mask_dir = write_pairs(tmp_path, SIZES, "binary")
    for path in sorted(mask_dir.glob("*.png")):
        alpha = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(path), np.dstack([np.zeros_like(alpha)] * 3 + [alpha]))  # BGRA
    message = error_of(folders(make_cfg, image_dir, mask_dir, "data.mask_mode=binary"))
    assert f"{mask_dir / 'img0.png'} holds its content only in its transparency (alpha)" in message
    assert "colour is (0, 0, 0) everywhere, while the alpha runs from 0 to 255" in message
    assert "Save the file with its content in the grey or colour values" in message

    grey_alpha = tmp_path / "grey_alpha.png"  # grey + alpha: white, drawn by its opacity
    grey_alpha.write_bytes(
        png_grey_alpha(np.full((6, 8), 255, np.uint8), np.full((6, 8), 7, np.uint8))
    )
    assert read_image(grey_alpha).shape == (6, 8, 3)  # one alpha value: nothing hidden there
    grey_alpha.write_bytes(
        png_grey_alpha(np.full((6, 8), 255, np.uint8), np.eye(6, 8, 0, np.uint8))
    )
    with pytest.raises(LungsegError, match=r"grey_alpha\.png holds its content only .*colour is "):
        read_image(grey_alpha)
    # content in the colours as well as the alpha (an overlay with soft edges): read as before
    bgra = np.dstack([np.eye(6, 8, 0, np.uint8) * 200] * 3 + [np.eye(6, 8, 0, np.uint8) * 255])
    cv2.imwrite(str(tmp_path / "overlay.png"), bgra)
    np.testing.assert_array_equal(read_image(tmp_path / "overlay.png")[:, :, 0], bgra[:, :, 0])


def test_rgb_mask_in_index_mode(make_cfg, tmp_path):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES, "palette")
    message = error_of(folders(make_cfg, image_dir, mask_dir))
    assert str(mask_dir / "img0.png") in message and "is a colour image" in message
    assert "set data.mask_mode=palette" in message


def test_16_bit_masks(make_cfg, tmp_path):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    for path in mask_dir.iterdir():  # class ids 0..2 stored as 16-bit: fine
        write_image(path, cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint16))
    dm = setup(image_dir, mask_dir)
    assert dm.num_classes == 3 and counts(dm) == (4, 1, 1)
    binary = (cv2.imread(str(mask_dir / "img1.png"), cv2.IMREAD_UNCHANGED) > 0) * 65535
    write_image(mask_dir / "img1.png", binary.astype(np.uint16))
    message = error_of(folders(make_cfg, image_dir, mask_dir))
    assert str(mask_dir / "img1.png") in message and "only the values 0 and 65535" in message
    assert "Set data.mask_mode=binary" in message


def test_images_of_mixed_sizes_and_channel_counts_work(tmp_path):
    sizes = [(24, 28), (40, 18), (17, 33), (64, 64), (24, 28), (31, 29)]
    image_dir, mask_dir = write_pairs(tmp_path, sizes)
    gray = {p.stem: cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in image_dir.iterdir()}
    write_image(image_dir / "img1.png", np.dstack([gray["img1"]] * 3))  # RGB
    alpha = np.full_like(gray["img2"], 255)
    cv2.imwrite(str(image_dir / "img2.png"), np.dstack([gray["img2"]] * 3 + [alpha]))  # RGBA
    write_image(image_dir / "img3.png", gray["img3"].astype(np.uint16) * 257)  # 16-bit
    (image_dir / "img4.png").unlink()
    cv2.imwrite(str(image_dir / "img4.jpg"), np.dstack([gray["img4"]] * 3))  # colour JPEG
    for channels in (1, 3):
        dm = setup(image_dir, mask_dir, in_channels=channels)
        for item in (dm.train_dataset[i] for i in range(len(dm.train_dataset))):
            assert item["image"].shape == (channels, 16, 16) and item["mask"].shape == (16, 16)
        assert counts(dm) == (4, 1, 1)


def test_non_ascii_and_space_names_work(make_cfg, tmp_path):
    image_dir, mask_dir = write_pairs(tmp_path / "données patients", SIZES)
    image_dir = image_dir.rename(image_dir.with_name("bilder ü"))
    names = ["Patient Ä 01", "患者 2", "spaced  name", "ñ-3", "a b", "z"]
    for i, name in enumerate(names):
        (image_dir / f"img{i}.png").rename(image_dir / f"{name}.png")
        (mask_dir / f"img{i}.png").rename(mask_dir / f"{name}_mask.png")
    cfg = folders(make_cfg, image_dir, mask_dir, "test_after_fit=false")
    train(cfg)
    with (Path(cfg.output_dir) / "split.csv").open(encoding="utf-8", newline="") as f:
        rows = dict(csv.reader(f))
    assert set(rows) == {"file", *names} and set(rows.values()) == {"split", "train", "val", "test"}


def test_split_that_leaves_val_or_test_empty(make_cfg, tmp_path):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES[:3])
    message = error_of(folders(make_cfg, image_dir, mask_dir))
    assert "data.split [0.6, 0.2, 0.2] leaves the val split empty" in message
    assert "3 files give train/val/test = 2/0/1" in message
    assert "raise the fraction of val, or set it to 0" in message


def test_patient_pattern_that_matches_nothing(make_cfg, tmp_path):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    message = error_of(
        folders(make_cfg, image_dir, mask_dir, r"data.group_pattern='^(patient\d+)_'")
    )
    assert "matches none of the 6 file names, e.g. img0" in message
    assert "Adjust the pattern" in message


@pytest.mark.parametrize("mode", ["index", "palette"])
def test_num_classes_not_matching_the_data(make_cfg, tmp_path, mode):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES, mode)
    palette = "data.palette={background:[0,0,0],lung:[0,255,0],tumour:[255,0,0]}"
    extra = [] if mode == "index" else ["data.mask_mode=palette", palette]
    message = error_of(folders(make_cfg, image_dir, mask_dir, "data.num_classes=2", *extra))
    if mode == "index":
        assert str(mask_dir / "img0.png") in message and "class ids 2" in message
        assert "Set data.num_classes to at least 3" in message
    else:
        assert "data.num_classes is 2 but data.palette has 3 classes" in message
        assert "Set data.num_classes to 3 or to null" in message


def test_cli_strict_false_lists_what_it_skipped_in_train_log_and_skipped_csv(tmp_path):
    image_dir, mask_dir = write_pairs(tmp_path, SIZES)
    (image_dir / "lonely.png").write_bytes((image_dir / "img0.png").read_bytes())
    (mask_dir / "img2.png").write_bytes(b"")
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"data.image_dir={image_dir}"]
        + [f"data.mask_dir={mask_dir}", "data.mask_mode=index", "data.strict=false"]
        + [*TINY, f"hydra.run.dir={run}", "data.split=[0.5,0.25,0.25]"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert "Skipping unpaired files" in log and "Skipping 1 of 6 image/mask pairs" in log
    skip_lines = [line for line in log.splitlines() if "Skipping" in line]
    assert not [line for line in skip_lines if ".py:" in line]  # not lungseg's source lines
    with (run / "skipped.csv").open() as f:
        rows = {Path(r["file"]).name: r["reason"] for r in csv.DictReader(f)}
    assert (
        rows.keys() == {"lonely.png", "img2.png"} and rows["lonely.png"] == "image without a mask"
    )
    assert "2 files were left out (data.strict=false)" in log


def cli_errors(script: str, args: list[str], cwd: Path) -> list[str]:
    """The `lungseg: error:` lines of `python <script> *args`, which must fail with status 1
    and without a traceback."""
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return [line for line in result.stderr.splitlines() if line.startswith("lungseg: error:")]


def test_cli_a_key_hydra_refuses_gets_the_nearest_setting(tmp_path):
    """Without a +, Hydra refuses a typo itself, before lungseg's checks, and suggested the +."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "data.imagesize=64"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    hint = result.stderr.rstrip().splitlines()[-1]
    assert hint.startswith(
        "lungseg: hint: data.imagesize is not a setting of train.py; did you mean "
        "data.image_size or data.image_dir? python train.py --cfg job prints them all"
    )
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("train.py", ["data.imagesize=64"], "did you mean data.image_size"),
        ("eval.py", ["ckpt_path=x.ckpt", "data.imagesize=64"], "not a setting of eval.py"),
        ("predict.py", ["ckpt_path=x.ckpt", "data.imagesize=64"], "not a setting of predict.py"),
        ("export.py", ["ckpt_path=x.ckpt", "formats=[onnx"], "the list in"),
        ("benchmarks/crossval.py", [".", "--thresholds", "1.5"], "give argmax or a probability"),
        (
            "benchmarks/quality.py",
            ["--image-dir", "i", "--mask-dir", "m", "--", "model.widht=8"],
            "did you mean model.width?",
        ),
    ],
)
def test_cli_a_refused_command_line_is_answered_without_importing_torch(
    tmp_path, script, args, message
):
    """Each command line imported torch and Lightning (9 s on a slow 2-core machine) before
    Hydra or argparse read it: a mistyped key waited that long for its one line."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "hydra" in imported  # -X importtime listed the imports
    assert not imported & {"torch", "pytorch_lightning", "albumentations", "cv2"}


@pytest.mark.parametrize(
    ("script", "args", "hint"),
    [
        (
            "train.py",
            ["data.split=[0.8,", "0.1,", "0.1]", "model=fcn"],
            "the shell split the override 'data.split=[0.8, 0.1, 0.1]' at its spaces into 3 "
            "arguments. Write it without spaces (data.split=[0.8,0.1,0.1]) or quote it whole: "
            "'data.split=[0.8, 0.1, 0.1]'.",
        ),
        (
            "train.py",
            ["data.image_dir=/my", "scans/images"],
            "the shell split the override 'data.image_dir=/my scans/images' at its spaces into 2 "
            "arguments. Quote it whole: 'data.image_dir=/my scans/images'.",
        ),
        (
            "train.py",
            ["data.group_pattern=^(CHNCXR_\\d+)_$"],  # the shell took the quotes
            "Quote the value for Hydra, and the whole override for the shell: "
            "'data.group_pattern=\"^(CHNCXR_\\d+)_$\"'.",
        ),
        ("train.py", ["data.split=[0.8,0.2,0.0"], "the list in 'data.split=[0.8,0.2,0.0' is not"),
        (
            "train.py",
            ["hydra/launcher=slurm", "~callbacks.early_stopping", "-cd=mine", "trainer.foo=1"],
            None,  # Hydra's groups, deletions, flags written with =, keys of the user's
        ),
        ("train.py", ["trainer.foo=1"], "trainer.foo is not a setting of train.py. python"),
        (
            "train.py",
            ["model=fcn", "~callbacks.early_stopping", "data.imagesize=3"],
            "data.imagesize is not a setting of train.py; did you mean data.image_size",
        ),
        (
            "train.py",
            ["-m", "model=unet,fcn", "trainer.max_epoch=1,2"],
            "trainer.max_epoch is not a setting of train.py; did you mean trainer.max_epochs or "
            "trainer.max_steps?",
        ),
        ("train.py", ["experiment=lung_ct", "postprocess.min_sise=4"], "mean postprocess.min_size"),
        ("eval.py", ["ckpt_pth=a.ckpt"], "ckpt_pth is not a setting of eval.py; did you mean"),
        ("predict.py", ["ckpt_path=a.ckpt", "input_dir=x", "tta=true"], None),  # not Hydra's
        ("train.py", ["--config-dir", "mine", "data.mine=1"], None),  # keys of the user's
        ("train.py", ["+data.imagesize=64", "hydra.job.chdir=false"], None),  # lungseg's to say
    ],
)
def test_override_hints_say_why_hydra_refused_a_command_line(script, args, hint):
    got = override_hint(script, Path(script).stem.replace("train", "config"), args)
    assert got == hint if hint is None else hint in got


def test_no_hint_follows_an_error_lungseg_reported(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", "data.imagesize=64"])
    for reported in (True, False):
        monkeypatch.setattr(lungseg.errors, "REPORTED", reported)
        with pytest.raises(SystemExit), hint_on_override_error("train.py", "config"):
            sys.exit(1)
        assert ("hint: data.imagesize" in capsys.readouterr().err) is not reported


def test_cli_unknown_setting_names_the_nearest_and_the_group_file(tmp_path):
    run = tmp_path / "run"
    errors = cli_errors("train.py", ["+data.imagesize=64", f"hydra.run.dir={run}"], tmp_path)
    assert errors == [
        "lungseg: error: data.imagesize is not a setting of data "
        "(lungseg.data.datamodule.SegDataModule); did you mean data.image_size? Remove "
        "+data.imagesize, or see conf/data/folders.yaml for the settings."
    ]
    # refused before the run's own files are written (Hydra's .hydra/ and train.log may be)
    assert not any((run / name).exists() for name in ("config.yaml", "split.csv", "checkpoints"))


def test_cli_predict_refuses_an_unknown_setting_before_it_writes(tmp_path):
    """`python predict.py ... +treshold=0.3` predicted with the checkpoint's threshold."""
    run, out = tmp_path / "run", tmp_path / "out"
    args = [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"input_dir={tmp_path}"]
    args += [f"output_dir={out}", "+treshold=0.3", f"hydra.run.dir={run}"]
    errors = cli_errors("predict.py", args, tmp_path)
    assert errors == [
        "lungseg: error: treshold is not a setting of predict.py; did you mean "
        "postprocess.threshold? Remove +treshold, or see conf/predict.yaml for the settings."
    ]
    assert not run.exists() and not out.exists()


def test_cli_empty_folder_is_one_line_without_traceback(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"data.image_dir={tmp_path / 'images'}",
            f"data.mask_dir={tmp_path / 'masks'}",
            "data.mask_mode=index",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("lungseg: error:")]
    assert len(errors) == 1 and "holds no image files" in errors[0], result.stderr[-2000:]
