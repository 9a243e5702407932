import pytest
import torch
import torch.nn.functional as F

from lungseg.errors import LungsegError
from lungseg.losses import CrossEntropyLoss, DiceCELoss, DiceLoss, FocalLoss, TverskyLoss


def perfect_logits(target: torch.Tensor, num_classes: int, scale: float = 50.0) -> torch.Tensor:
    return F.one_hot(target, num_classes).permute(0, 3, 1, 2).float() * scale


@pytest.fixture
def target() -> torch.Tensor:
    t = torch.zeros(2, 8, 8, dtype=torch.long)
    t[0, 2:5, 2:5] = 1
    t[1, 4:, :3] = 2
    return t


def test_dice_loss_is_zero_for_perfect_and_one_for_disjoint(target):
    loss = DiceLoss(smooth=1e-6)
    assert loss(perfect_logits(target, 3), target).item() == pytest.approx(0.0, abs=1e-4)
    wrong = torch.zeros_like(target)  # predicts background everywhere
    assert loss(perfect_logits(wrong, 3), target).item() == pytest.approx(1.0, abs=1e-4)


def test_dice_loss_matches_formula(target):
    logits = torch.randn(2, 3, 8, 8)
    p = logits.softmax(1)
    t = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    dice = (2 * (p * t).sum((0, 2, 3)) + 1) / (p.sum((0, 2, 3)) + t.sum((0, 2, 3)) + 1)
    expected = 1 - dice[1:].mean()
    assert DiceLoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    with_bg = DiceLoss(include_background=True)(logits, target).item()
    assert with_bg == pytest.approx(1 - dice.mean().item(), rel=1e-5)


def test_per_image_dice_matches_formula_and_punishes_false_positives_on_empty_images(target):
    logits = torch.randn(2, 3, 8, 8)
    p = logits.softmax(1)
    t = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    dice = (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)  # (N, C)
    expected = 1 - dice.mean(0)[1:].mean()
    assert DiceLoss(per_image=True)(logits, target).item() == pytest.approx(expected.item())
    combined = DiceCELoss(per_image=True)(logits, target).item()
    ce = F.cross_entropy(logits, target).item()
    assert combined == pytest.approx(expected.item() + ce, rel=1e-5)
    # Image 0 has no class 2: a 3-pixel false positive of class 2 there costs the per-image
    # loss about half of a class-and-image term (1/4 of the mean over 2 classes x 2 images),
    # batch Dice much less, since image 1's class-2 pixels dilute it.
    pred = target.clone()
    pred[0, 0, :3] = 2
    batch_cost = DiceLoss(smooth=1e-6)(perfect_logits(pred, 3), target).item()
    image_cost = DiceLoss(smooth=1e-6, per_image=True)(perfect_logits(pred, 3), target).item()
    assert image_cost == pytest.approx(0.25, abs=1e-3)
    assert batch_cost < 0.1


def test_skip_empty_scores_each_class_only_on_the_images_that_hold_it(target):
    """loss.skip_empty: an image without class c adds no Dice term for c (its false positives
    are left to the cross-entropy); a class in no image of the batch adds none at all."""
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    p = logits.softmax(1)
    t = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    dice = (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)  # (N, C)
    # class 1 only in image 0, class 2 only in image 1
    expected = 1 - (dice[0, 1] + dice[1, 2]) / 2
    loss = DiceLoss(per_image=True, skip_empty=True)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    # A false positive of class 2 on image 0 costs the Dice term nothing now.
    pred = target.clone()
    pred[0, 0, :3] = 2
    assert loss(perfect_logits(pred, 3), target).item() == pytest.approx(0.0, abs=1e-3)
    assert DiceLoss(per_image=True)(perfect_logits(pred, 3), target).item() > 0.15
    # Only class 1 present: class 2's weight drops out of the average.
    only_one = target.clone()
    only_one[only_one == 2] = 0
    weighted = DiceLoss(per_image=True, skip_empty=True, class_weights=[1, 1, 5])
    assert weighted(logits, only_one).item() == pytest.approx(1 - dice[0, 1].item(), rel=1e-5)
    # An all-background batch: no Dice term, zero loss with a graph; DiceCE is its CE.
    empty = torch.zeros_like(target)
    zero = loss(logits, empty)
    zero.backward()
    assert zero.item() == 0.0 and logits.grad.abs().sum() == 0
    combined = DiceCELoss(per_image=True, skip_empty=True)(logits, empty).item()
    assert combined == pytest.approx(F.cross_entropy(logits, empty).item(), rel=1e-6)


def test_skip_empty_without_per_image_is_refused_with_the_fix():
    with pytest.raises(LungsegError, match="loss.skip_empty=true needs loss.per_image=true"):
        DiceLoss(skip_empty=True)


def test_class_weights_change_the_losses(target):
    logits = torch.randn(2, 3, 8, 8)
    plain_ce = CrossEntropyLoss()(logits, target)
    assert plain_ce.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    weighted = CrossEntropyLoss(class_weights=[0.1, 1.0, 5.0])(logits, target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor([0.1, 1.0, 5.0]))
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)
    assert DiceLoss(class_weights=[1, 1, 5])(logits, target) != DiceLoss()(logits, target)


def test_dice_ce_is_weighted_sum_and_has_gradients(target):
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = DiceCELoss(dice_weight=0.3, ce_weight=0.7)(logits, target)
    expected = 0.3 * DiceLoss()(logits, target) + 0.7 * CrossEntropyLoss()(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_losses_accept_bf16_logits(target):
    logits = torch.randn(2, 3, 8, 8).bfloat16()
    for loss in (DiceLoss(), CrossEntropyLoss(), DiceCELoss()):
        assert torch.isfinite(loss(logits, target))


@pytest.mark.parametrize("make", [CrossEntropyLoss, DiceLoss, DiceCELoss, FocalLoss])
def test_class_weights_stay_float32_in_a_bf16_module(make, target):
    """trainer.precision=bf16-true casts the whole LightningModule, the loss's weight buffer
    with it: cross-entropy then stopped ("expected scalar type Float but found BFloat16") and
    0.1 became 0.10009765625. The weights stay float32; the losses are those of float32."""
    weights = [0.1, 1.0, 5.0]
    logits = torch.randn(2, 3, 8, 8)
    expected = make(class_weights=weights)(logits, target)
    cast = make(class_weights=weights).to(torch.bfloat16)
    for buffer in cast.buffers():
        assert buffer.dtype == torch.float32 and buffer.tolist() == pytest.approx(weights)
    assert cast(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert cast(logits.bfloat16(), target).item() == pytest.approx(expected.item(), rel=0.02)


def test_focal_loss_matches_formula_and_reduces_to_ce(target):
    logits = torch.randn(2, 3, 8, 8)
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-5
    )
    log_p = F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
    w = torch.tensor([0.5, 1.0, 2.0])[target]
    expected = (-((1 - log_p.exp()) ** 2) * log_p * w).mean()
    got = FocalLoss(gamma=2.0, class_weights=[0.5, 1.0, 2.0])(logits, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 2.0])
def test_focal_loss_keeps_its_formula_and_finite_gradients_where_the_network_is_sure(target, gamma):
    """(1 - p)^gamma has an infinite slope at p = 1 for gamma < 1, and p rounds to 1 once a
    logit leads by about 17: a finite loss used to give NaN gradients there."""
    logits = torch.randn(2, 3, 8, 8)
    log_p = F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
    expected = (-((1 - log_p.exp()) ** gamma) * log_p).mean()
    assert FocalLoss(gamma=gamma)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)

    sure = perfect_logits(target, 3, scale=30.0)
    sure[:, :, 0, 0] = torch.tensor([0.0, 30.0, 0.0])  # sure and wrong on one pixel
    onehot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    for t in (target, onehot):
        x = sure.clone().requires_grad_(True)
        loss = FocalLoss(gamma=gamma)(x, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0


def test_tversky_with_equal_weights_is_dice_and_penalises_misses(target):
    logits = torch.randn(2, 3, 8, 8)
    tversky = TverskyLoss(alpha=0.5, beta=0.5)(logits, target)
    # Same value as Dice once the smoothing terms line up (Dice adds smooth to 2TP).
    assert tversky.item() == pytest.approx(DiceLoss(smooth=2.0)(logits, target).item(), rel=1e-5)
    # Predicting background everywhere misses all foreground: beta-heavy Tversky punishes it more.
    miss = perfect_logits(torch.zeros_like(target), 3, scale=5.0)
    assert TverskyLoss(alpha=0.3, beta=0.7)(miss, target) > TverskyLoss(alpha=0.7, beta=0.3)(
        miss, target
    )


@pytest.mark.parametrize(
    "loss",
    [
        CrossEntropyLoss(),
        CrossEntropyLoss(class_weights=[1.0, 2.0, 3.0], label_smoothing=0.1),
        DiceLoss(),
        DiceLoss(per_image=True, include_background=True),
        DiceLoss(per_image=True, skip_empty=True),
        DiceCELoss(class_weights=[1.0, 2.0, 3.0]),
        FocalLoss(),
        FocalLoss(class_weights=[1.0, 2.0, 3.0]),
        TverskyLoss(),
    ],
    ids=lambda loss: type(loss).__name__,
)
def test_soft_targets_one_hot_equal_class_ids_and_fractions_count(loss, target):
    """data.soft_masks feeds class fractions (N, C, H, W): a one-hot one is the class-id loss;
    a pixel half lung, half background pulls the prediction to 0.5 there."""
    torch.manual_seed(0)
    logits = torch.randn(target.shape[0], 3, *target.shape[1:], requires_grad=True)
    onehot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert torch.allclose(loss(logits, onehot), loss(logits, target), atol=1e-6)
    soft = onehot.clone()
    soft[:, :, 0, 0] = torch.tensor([0.5, 0.5, 0.0])
    assert not torch.allclose(loss(logits, soft), loss(logits, target))
    loss(logits, soft).backward()
    assert torch.isfinite(logits.grad).all()


def test_soft_cross_entropy_is_minimal_at_the_fractions():
    """Cross-entropy against fractions t is lowest where softmax(logits) = t, not at its arg-max."""
    t = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1)
    loss = CrossEntropyLoss()
    at = [loss(torch.log(torch.tensor([1 - q, q])).view(1, 2, 1, 1), t) for q in (0.5, 0.7, 0.99)]
    assert at[1] < at[0] and at[1] < at[2]
