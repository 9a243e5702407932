"""Checkpoint loading, the shared preprocessing and probabilities at the original size.

The ``checkpoints`` fixture (also used by test_evaluate.py and test_predict.py) trains two
tiny models once per session."""

import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, split_items
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.utilities.model_summary import ModelSummary

from lungseg.data.datamodule import SegDataModule
from lungseg.data.folders import read_image
from lungseg.data.transforms import normalize, preprocess
from lungseg.errors import LungsegError
from lungseg.inference import load_checkpoint, predict_probabilities, resolve_device
from lungseg.module import SegmentationModule
from lungseg.train import plain, train

CPU = torch.device("cpu")
_TRAINED: dict[str, Path] = {}  # filled once per test session


def write_pairs(root, sizes, mode="index", rgb=False, empty=(), seed=0, mask_suffix=""):
    """root/images/img{i}.png and root/masks/img{i}{mask_suffix}.png with a class-1 ellipse and
    a class-2 disc inside it (index: ids, binary: one class as 0/255, palette: the demo
    colours); masks listed in ``empty`` are all background. Returns (image_dir, mask_dir)."""
    rng = np.random.default_rng(seed)
    image_dir, mask_dir = root / "images", root / "masks"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        mask = np.zeros((h, w), np.uint8)
        if i not in empty:
            centre = (int(rng.integers(w // 3, 2 * w // 3)), int(rng.integers(h // 3, 2 * h // 3)))
            cv2.ellipse(mask, centre, (w // 4, h // 5), float(rng.uniform(0, 180)), 0, 360, 1, -1)
            if mode != "binary":
                cv2.circle(mask, centre, max(2, min(h, w) // 10), 2, -1)
        image = (50 + 90 * mask + rng.integers(0, 30, (h, w))).astype(np.uint8)
        if rgb:
            image = np.stack([image, 255 - image, image // 2], axis=-1)
        stored = {
            "index": mask,
            "binary": mask * 255,
            "palette": np.array([[0, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)[mask],  # BGR
        }[mode]
        cv2.imwrite(str(image_dir / f"img{i}.png"), image)
        cv2.imwrite(str(mask_dir / f"img{i}{mask_suffix}.png"), stored)
    return image_dir, mask_dir


def save_variant(ckpt: Path, path: Path, data_info=None, force_class=None, hparams=None) -> Path:
    """A copy of a checkpoint with data_info entries replaced, other hyper-parameters replaced,
    or the output bias of class ``force_class`` raised so that it wins at every pixel."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["data_info"].update(data_info or {})
    checkpoint["hyper_parameters"].update(hparams or {})
    if force_class is not None:
        checkpoint["state_dict"]["net.head.bias"][force_class] += 1e4
    torch.save(checkpoint, path)
    return path


def trained_checkpoints(tmp_path_factory, demo_dir) -> dict[str, Path]:
    """Two tiny models, trained once per test session (the ``checkpoints`` fixture of
    test_inference.py, test_evaluate.py and test_predict.py):
    "palette": demo data (gray, 3 classes, colour masks, 48 px images at 32 px);
    "binary": RGB images, 0/255 masks, 3 input channels, median blur, per-image normalisation,
    40x48 images at 24x32; "index": the binary model relabelled as trained on index masks."""
    if not _TRAINED:
        root = tmp_path_factory.mktemp("trained")
        image_dir, mask_dir = write_pairs(root / "data", [(40, 48)] * 12, "binary", rgb=True)
        runs = {
            "palette": [f"data.demo_dir={demo_dir}"],
            "binary": [
                f"data.image_dir={image_dir}",
                f"data.mask_dir={mask_dir}",
                "data.mask_mode=binary",
                "data.in_channels=3",
                "data.median_blur=3",
                "data.normalize=image",
                "data.image_size=[24,32]",
            ],
        }
        for name, overrides in runs.items():
            with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(
                    "config",
                    overrides=[
                        f"output_dir={root / name}",
                        *TINY,
                        "test_after_fit=false",
                        *overrides,
                    ],
                )
            _TRAINED[name] = Path(train(cfg)["best_checkpoint"])
        _TRAINED["index"] = save_variant(
            _TRAINED["binary"], root / "index.ckpt", {"mask_mode": "index"}
        )
    return dict(_TRAINED)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, demo_dir) -> dict[str, Path]:
    return trained_checkpoints(tmp_path_factory, demo_dir)


def run_data(ckpt: Path) -> tuple[SegDataModule, Path]:
    """The training run's data, set up from its config.yaml as train.py does, and its image
    folder."""
    cfg = OmegaConf.load(ckpt.parent.parent / "config.yaml")
    dm = instantiate(cfg.data, _convert_="all", _recursive_=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm, Path(cfg.data.image_dir or Path(cfg.data.demo_dir) / "images")


def test_preprocessing_is_the_training_preprocessing(tmp_path):
    """The cached training images are exactly transforms.preprocess + normalize of the files,
    with the settings the checkpoint stores (RGB → gray, shrink, median blur, CT window)."""
    image_dir, mask_dir = write_pairs(tmp_path, [(40, 48), (30, 36), (41, 47)] * 2, rgb=True)
    for path in image_dir.iterdir():  # 16-bit CT-like values with an offset
        cv2.imwrite(str(path), cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 40)
    dm, items = split_items(
        image_dir,
        mask_dir,
        mask_mode="index",
        image_size=[24, 28],
        median_blur=3,
        window=[500, 9000],
        intensity_offset=100,
    )
    info = dm.data_info()
    for item in items:
        raw = read_image(image_dir / f"{item['name']}.png")
        expected = normalize(preprocess(raw, info), info).transpose(2, 0, 1)
        assert item["image"].shape == (1, 24, 28)
        assert torch.equal(item["image"], torch.from_numpy(np.ascontiguousarray(expected)))


def test_load_checkpoint(checkpoints):
    model = load_checkpoint(checkpoints["palette"], CPU)
    assert not model.training
    info = model.hparams.data_info
    assert info["class_names"] == ["background", "lung", "tumour"]
    assert info["image_size"] == [32, 32] and info["mask_mode"] == "palette"
    assert load_checkpoint(checkpoints["binary"], CPU).hparams.data_info["in_channels"] == 3
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _MakeDirs:
    """Pickles as a call to os.makedirs: unpickling it with weights_only=False would run it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("folder", "is a folder"),
        ("text", "is not a lungseg checkpoint"),
        ("empty", "is not a lungseg checkpoint"),
        ("pickle_runs_code", "weights_only=True"),
        ("plain_torch_file", "no hyper_parameters with data_info"),
        ("hydra_target_runs_code", "outside the trusted modules"),
        ("wrong_architecture", "could not be loaded as a lungseg model"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, checkpoints, case, message):
    marker = tmp_path / "code_ran"
    path = tmp_path / "model.ckpt"
    if case == "folder":
        path.mkdir()
    elif case == "text":
        path.write_text("not a checkpoint\n")
    elif case == "empty":
        path.touch()
    elif case == "pickle_runs_code":
        torch.save({"state_dict": _MakeDirs(marker)}, path)
    elif case == "plain_torch_file":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "hydra_target_runs_code":
        net = {"_target_": "os.makedirs", "name": str(marker)}
        save_variant(checkpoints["palette"], path, hparams={"net": net})
    elif case == "wrong_architecture":
        net = torch.load(checkpoints["palette"], weights_only=True)["hyper_parameters"]["net"]
        save_variant(checkpoints["palette"], path, hparams={"net": {**net, "width": 8}})
    with pytest.raises(LungsegError, match=message) as error:
        load_checkpoint(path, CPU)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_trusted_modules_are_package_prefixes(tmp_path, checkpoints):
    ckpt = checkpoints["palette"]
    with pytest.raises(LungsegError, match="lungseg.losses.DiceCELoss, lungseg.models.unet.UNet"):
        load_checkpoint(ckpt, CPU, trusted_modules=["torch"])
    assert load_checkpoint(ckpt, CPU, trusted_modules=["torch", "lungseg.models", "lungseg.losses"])
    lookalike = {"_target_": "lungseg_extra.Net"}  # starts with "lungseg" but is not in it
    path = save_variant(ckpt, tmp_path / "m.ckpt", hparams={"loss": lookalike})
    with pytest.raises(LungsegError, match="lungseg_extra.Net"):
        load_checkpoint(path, CPU)


def test_a_run_folder_given_as_ckpt_path_names_its_checkpoints(tmp_path, checkpoints):
    """ckpt_path=<run> got only 'is a folder' (found by a tester)."""
    run = Path(checkpoints["palette"]).parent.parent
    with pytest.raises(LungsegError, match=r"is a folder \(it holds checkpoints/.*\.ckpt"):
        load_checkpoint(run, CPU)
    with pytest.raises(LungsegError, match=r"is a folder \(it holds .*\.ckpt.*: give one of"):
        load_checkpoint(run / "checkpoints", CPU)


def _hostile_hparams(case: str, victim: Path, net: dict) -> dict:
    """Hyper-parameters naming callables under the default trusted modules that are not
    classes of the kind their entry builds; write_split would overwrite ``victim``."""
    write_split = {
        "_target_": "lungseg.data.splits.write_split",
        "split": {"img0": "train"},
        "path": str(victim),
    }
    clip = {"_target_": "torch.nn.utils.clip_grad_norm_", "parameters": [], "max_norm": 1.0}
    hidden = f"{{_target_:{write_split['_target_']},split:{{img0:train}},path:'{victim}'}}"
    return {
        "function_as_net": {"net": write_split},
        "nested_function_in_net": {"net": {**net, "norm": write_split}},
        "torch_function_as_loss": {
            "loss": {"_target_": "torch.nn.init.zeros_", "tensor": torch.ones(3)}
        },
        "nested_function_in_loss_args": {
            "loss": {"_target_": "torch.nn.Sequential", "_args_": [clip]}
        },
        "function_as_optimizer": {"optimizer": {"_target_": "torch.optim.swa_utils.update_bn"}},
        "module_as_optimizer": {"optimizer": {"_target_": "torch.nn.Linear"}},
        "optimizer_as_scheduler": {"scheduler": {"_target_": "torch.optim.SGD"}},
        "class_defined_outside": {"net": {"_target_": "lungseg.module.pl.LightningModule"}},
        "interpolation_in_net": {"net": {**net, "dropout": f"${{oc.create:{hidden}}}"}},
        "older_hparams_key": {"hparams": {"loss": write_split}},
    }[case]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("function_as_net", "_target_ lungseg.data.splits.write_split is a function, not a class"),
        ("nested_function_in_net", "lungseg.data.splits.write_split is a function, not a class"),
        ("torch_function_as_loss", "_target_ torch.nn.init.zeros_ is a function, not a class"),
        ("nested_function_in_loss_args", "torch.nn.utils.clip_grad_norm_ is a function"),
        ("function_as_optimizer", "torch.optim.swa_utils.update_bn is a function, not a class"),
        ("module_as_optimizer", "torch.nn.Linear is not a subclass of torch.optim.Optimizer"),
        (
            "optimizer_as_scheduler",
            "torch.optim.SGD is not a subclass of torch.optim.lr_scheduler.LRScheduler",
        ),
        ("class_defined_outside", "LightningModule is defined in pytorch_lightning"),
        ("interpolation_in_net", "in its net hyper-parameter, .* is an interpolation"),
        ("older_hparams_key", "hyper_parameters have no loss"),
    ],
)
def test_targets_must_be_classes_of_their_kind(tmp_path, checkpoints, case, message):
    """Under the trusted modules, only classes of the kind each entry builds (nested ones
    too) are accepted, and refused before anything is called: write_split, reached as the
    network, nested in it, through an interpolation or through Lightning's older
    hyper-parameter key "hparams", leaves the victim file alone."""
    victim = tmp_path / "victim" / "important.txt"
    victim.parent.mkdir()
    victim.write_text("precious\n")
    checkpoint = torch.load(checkpoints["palette"], weights_only=True)
    hostile = _hostile_hparams(case, victim, checkpoint["hyper_parameters"]["net"])
    if "hparams" in hostile:  # Lightning merges it in under hyper_parameters
        del checkpoint["hyper_parameters"]["loss"]
        checkpoint.update(hostile)
    else:
        checkpoint["hyper_parameters"].update(hostile)
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(LungsegError, match=message) as error:
        load_checkpoint(path, CPU)
    assert str(path) in str(error.value)
    assert victim.read_text() == "precious\n"


def test_untrusted_modules_are_not_imported(tmp_path, checkpoints, monkeypatch):
    """Importing a module can run code, so a target outside trusted_modules is refused by
    its name alone."""
    marker = tmp_path / "imported"
    (tmp_path / "lungseg_plugin.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = {"_target_": "lungseg_plugin.Net"}
    path = save_variant(checkpoints["palette"], tmp_path / "m.ckpt", hparams={"net": net})
    with pytest.raises(LungsegError, match="lungseg_plugin.Net, which are outside"):
        load_checkpoint(path, CPU)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("model", "loss", "optimizer", "scheduler"),
    [
        ("unet", "ce", "adam", "none"),
        ("fcn", "dice", "adamw", "cosine"),
        ("segnet", "focal", "sgd", "plateau"),
        ("deeplab", "tversky", "adamw", "cosine"),
    ],
)
def test_every_architecture_loads(tmp_path, checkpoints, model, loss, optimizer, scheduler):
    """A checkpoint of each architecture, with the losses, optimisers and schedulers of conf/
    (the trained checkpoints use dice_ce), passes the checks, loads its weights and builds its
    optimiser and scheduler."""
    checkpoint = torch.load(checkpoints["palette"], weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                *TINY,
                f"data.num_classes={hparams['net']['num_classes']}",
                f"model={model}",
                f"loss={loss}",
                f"optimizer={optimizer}",
                f"scheduler={scheduler}",
            ],
        )
    hparams.update(
        net=plain(cfg.model),
        loss=plain(cfg.loss),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
    )
    saved = SegmentationModule(**hparams)
    checkpoint["state_dict"] = saved.state_dict()
    torch.save(checkpoint, tmp_path / "m.ckpt")
    loaded = load_checkpoint(tmp_path / "m.ckpt", CPU)
    assert type(loaded.net) is type(saved.net)
    weights = loaded.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in saved.state_dict().items())
    loaded.configure_optimizers()


def _softmax_at(model, x, size, flips=()):
    """Reference: mean softmax of x (1, C, h, w) and its flips, resized to size (H, W)."""
    with torch.no_grad():
        probs = [model(x).softmax(1)] + [model(x.flip(d)).softmax(1).flip(d) for d in flips]
        prob = torch.stack(probs).mean(0)
        return F.interpolate(prob, size=size, mode="bilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize("name", ["palette", "binary"])
def test_probabilities_at_original_size_match_the_training_pipeline(checkpoints, name):
    """Network inputs from the training DataModule, softmax, bilinear resize to the file's
    size: what predict_probabilities returns from the raw file."""
    model = load_checkpoint(checkpoints[name], CPU)
    dm, folder = run_data(checkpoints[name])
    items = [dm.test_dataset[i] for i in range(len(dm.test_dataset))]
    raws = [read_image(folder / f"{item['name']}.png") for item in items]
    probs = predict_probabilities(model, raws)
    for item, raw, prob in zip(items, raws, probs, strict=True):
        assert prob.shape == (model.hparams.data_info["num_classes"], *raw.shape[:2])
        assert prob.dtype == np.float32
        assert np.allclose(prob.sum(0), 1, atol=1e-5)
        expected = _softmax_at(model, item["image"][None], raw.shape[:2])
        assert np.allclose(prob, expected, atol=1e-5)


def test_mixed_sizes_in_one_batch(checkpoints):
    model = load_checkpoint(checkpoints["binary"], CPU)
    rng = np.random.default_rng(1)
    raws = [
        rng.integers(0, 255, (37, 53), dtype=np.uint8),  # gray into a 3-channel model
        rng.integers(0, 65535, (20, 70, 3), dtype=np.uint16),
        rng.random((64, 64), dtype=np.float32),
    ]
    probs = predict_probabilities(model, raws)
    assert [p.shape for p in probs] == [(2, 37, 53), (2, 20, 70), (2, 64, 64)]
    # one at a time gives the same: the images of a batch do not interact
    alone = predict_probabilities(model, raws[1:2])[0]
    assert np.allclose(alone, probs[1], atol=1e-5)


def test_test_time_augmentation(checkpoints):
    model = load_checkpoint(checkpoints["palette"], CPU)
    dm, folder = run_data(checkpoints["palette"])
    item = dm.test_dataset[0]
    raw = read_image(folder / f"{item['name']}.png")
    plain = predict_probabilities(model, [raw])[0]
    for flips, dims in [(["horizontal"], [(-1,)]), (["horizontal", "vertical"], [(-1,), (-2,)])]:
        tta = predict_probabilities(model, [raw], flips)[0]
        assert np.allclose(
            tta, _softmax_at(model, item["image"][None], raw.shape[:2], dims), atol=1e-5
        )
        difference = np.abs(tta - plain)
        assert difference.max() > 1e-4, "TTA changed nothing"
        assert difference.mean() < 0.1, "TTA should average, not replace, the prediction"
    with pytest.raises(LungsegError, match="tta_flips"):
        predict_probabilities(model, [raw], ["diagonal"])


def test_an_ensemble_averages_its_members_softmax(tmp_path, checkpoints):
    """ckpt_path=[a,b]: the mean of the members' softmax, each member preparing the images
    with its own data_info (here other normalisation statistics); members that predict other
    classes are refused, naming the file and what differs."""
    from lungseg.inference import Ensemble, load_from_config

    first = checkpoints["binary"]
    info = load_checkpoint(first, CPU).hparams.data_info
    other = save_variant(
        first, tmp_path / "other.ckpt", {"normalize": "dataset", "mean": [0.3], "std": [0.2]}
    )
    members = [load_checkpoint(path, CPU) for path in (first, other)]
    raws = [np.random.default_rng(2).integers(0, 255, (40, 48, 3), dtype=np.uint8)]
    alone = [predict_probabilities(m, raws)[0] for m in members]
    assert np.abs(alone[0] - alone[1]).max() > 1e-3  # the statistics change the prediction
    ensemble = Ensemble(members, [str(first), str(other)])
    assert np.allclose(predict_probabilities(ensemble, raws)[0], (alone[0] + alone[1]) / 2)
    assert ensemble.hparams.data_info == info

    def cfg(value):
        return OmegaConf.create(
            {"ckpt_path": value, "device": "cpu", "trusted_modules": ["lungseg", "torch"]}
        )

    assert isinstance(load_from_config(cfg([str(first), str(other)])), Ensemble)
    assert isinstance(load_from_config(cfg(str(first))), SegmentationModule)
    with pytest.raises(LungsegError, match=r"ckpt_path is \[\]; give a checkpoint's path"):
        load_from_config(cfg([]))
    renamed = save_variant(first, tmp_path / "renamed.ckpt", {"class_names": ["bg", "tumour"]})
    with pytest.raises(
        LungsegError,
        match=rf"{re.escape(str(renamed))} cannot join an ensemble with {re.escape(str(first))}: "
        r"their class_names",
    ):
        load_from_config(cfg([str(first), str(renamed)]))


def test_the_model_summary_shows_shapes_and_flops(checkpoints):
    """The module carries one input image as data_info describes it (channels, height, width),
    so that Lightning's model summary prints the network's input/output shapes and the FLOPs
    of a forward pass instead of "?" and 0."""
    model = load_checkpoint(checkpoints["binary"], CPU)
    height, width = model.hparams.data_info["image_size"]
    assert height != width  # the order of the two sides is checked too
    summary = ModelSummary(model)
    row = summary.layer_names.index("net")
    assert summary.in_sizes[row] == [1, 3, height, width]
    assert summary.out_sizes[row] == [1, model.hparams.net["num_classes"], height, width]
    assert summary.total_flops > 0


def test_skipped_files_are_counted_in_words_that_agree(caplog):
    from lungseg.inference import report_skipped

    what = ("image that cannot be read is", "images that cannot be read are")
    with caplog.at_level("WARNING", logger="lungseg.inference"):
        report_skipped([(Path("a.png"), "a.png is corrupt")], what)
        report_skipped([(Path("a.png"), "corrupt"), (Path("b.png"), "empty")], what)
    assert "1 image that cannot be read is left out (strict=false): (1) a.png is corrupt" in (
        caplog.text
    )
    assert "2 images that cannot be read are left out (strict=false): (1) corrupt (2) empty" in (
        caplog.text
    )
