"""``adversarial``: FGSM and PGD steps against a hand-worked linear model, brute force and re-checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from jobs.core.pixels import normalize
from jobs.dataset.adversarial import Adversarial, fgsm, pgd, smallest_flips
from tests.harness import MEAN, STD, map_table


def linear_model(w0: list[float], w1: list[float], b: tuple[float, float] = (0.0, 0.0)) -> nn.Module:
    """Two classes, logits ``W x + b`` on a 1x1 RGB input."""
    fc = nn.Linear(3, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([w0, w1]))
        fc.bias.copy_(torch.tensor(b))
    return nn.Sequential(nn.Flatten(), fc).eval()


def norm(x: torch.Tensor) -> torch.Tensor:
    return normalize(x, MEAN, STD)


def test_fgsm_flips_a_linear_model_at_the_hand_worked_step():
    # Class 0 wins by the margin m = (w0 - w1) . x + (b0 - b1), x = (p - 0.5) / 0.25. FGSM moves
    # every pixel by eps against sign(w0 - w1), so the margin falls by eps * sum|w0 - w1| / 0.25.
    model = linear_model([1.0, -2.0, 0.5], [0.0, 0.0, 0.0])
    p = torch.tensor([0.6, 0.45, 0.5]).view(1, 3, 1, 1)
    margin = (1.0 * 0.1 - 2.0 * -0.05 + 0.5 * 0.0) / 0.25  # = 0.8
    needed = margin * 0.25 / 3.5  # 0.0571...
    epsilons = [0.01, 0.03, 0.05, 0.06, 0.1]
    r = smallest_flips(model, norm, p, epsilons, steps=5)
    assert r["predicted"].tolist() == [0]
    assert needed == pytest.approx(0.05714, abs=1e-4)
    assert r["epsilon_fgsm"].item() == pytest.approx(0.06)  # the smallest tried step above 0.0571
    # A linear model's best L-inf step is FGSM's: PGD cannot flip it with less.
    assert np.isnan(r["epsilon_pgd"].item()) and not r["by_pgd"].item()
    assert r["epsilon"].item() == pytest.approx(0.06) and r["adversarial_class"].tolist() == [1]
    moved = r["adversarial"] - p
    assert moved.abs().max().item() == pytest.approx(0.06, abs=1e-6)
    assert torch.equal(torch.sign(moved).flatten(), torch.tensor([-1.0, 1.0, -1.0]))


def test_nothing_flips_within_the_steps():
    model = linear_model([5.0, 5.0, 5.0], [0.0, 0.0, 0.0], b=(10.0, 0.0))
    r = smallest_flips(model, norm, torch.full((2, 3, 1, 1), 0.5), [0.01, 0.02], steps=3)
    assert torch.isnan(r["epsilon"]).all() and torch.isnan(r["epsilon_fgsm"]).all()
    assert torch.equal(r["adversarial"], torch.full((2, 3, 1, 1), 0.5))


def conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_fgsm_matches_a_per_image_loop_and_every_flip_is_real():
    model = conv_model(seed=2)
    p = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    epsilons = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
    r = smallest_flips(model, norm, p, epsilons, steps=4)
    for i in range(len(p)):
        # Brute force: the first epsilon, ascending, at which one FGSM step flips the prediction.
        with torch.no_grad():
            clean = model(norm(p[i:i + 1])).argmax(dim=1)
        with torch.enable_grad():
            leaf = p[i:i + 1].clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(norm(leaf)), clean)
            (grad,) = torch.autograd.grad(loss, leaf)
        expected = float("nan")
        for eps in epsilons:
            with torch.no_grad():
                if model(norm(fgsm(p[i:i + 1], grad, torch.tensor([eps])))).argmax(dim=1) != clean:
                    expected = eps
                    break
        got = r["epsilon_fgsm"][i].item()
        assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected)
        # Whatever found it, the stored image is within the step and really flips.
        if not np.isnan(r["epsilon"][i].item()):
            assert (r["adversarial"][i] - p[i]).abs().max().item() <= r["epsilon"][i].item() + 1e-6
            with torch.no_grad():
                assert model(norm(r["adversarial"][i:i + 1])).argmax(dim=1).item() != clean.item()
            assert r["adversarial"][i].min() >= 0 and r["adversarial"][i].max() <= 1
        if r["by_pgd"][i]:
            assert r["epsilon_pgd"][i] < r["epsilon_fgsm"][i] or np.isnan(r["epsilon_fgsm"][i].item())
    assert not torch.isnan(r["epsilon"]).all()  # the test exercises flips
    # Batched equals per image.
    for i in range(len(p)):
        alone = smallest_flips(model, norm, p[i:i + 1], epsilons, steps=4)
        for key in ("epsilon", "epsilon_fgsm", "epsilon_pgd"):
            a, b = alone[key].item(), r[key][i].item()
            assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b)


def test_pgd_stays_in_the_ball_and_beats_fgsm_somewhere():
    model = conv_model(seed=3)
    p = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        classes = model(norm(p)).argmax(dim=1)
    eps = torch.full((16,), 0.03)
    x, flipped = pgd(model, norm, p, classes, eps, steps=10)
    assert (x - p).abs().max() <= 0.03 + 1e-6 and x.min() >= 0 and x.max() <= 1
    with torch.no_grad():
        assert torch.equal(model(norm(x)).argmax(dim=1) != classes, flipped)
    r = smallest_flips(model, norm, p, [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4], steps=6)
    assert bool(r["by_pgd"].any()), "PGD, the stronger attack, should flip some image at a smaller step"


def test_analysis_rows_and_pictures():
    model = conv_model(seed=2)
    px = np.random.default_rng(5).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    ids = [f"i{k}" for k in range(5)]
    analysis = Adversarial(Adversarial.Params(sample=None, epsilons=[0.2, 0.01, 0.05], steps=3, cell=16))
    assert analysis.params.epsilons == [0.01, 0.05, 0.2]  # sorted
    table, images = map_table(analysis, model, ids, px, labels=[0, 1, 2, 3, 0], batch_size=2)
    assert table.column_names == analysis.schema()[""].names
    rows = table.to_pandas()
    direct = smallest_flips(model, norm, torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255, [0.01, 0.05, 0.2], 3)
    np.testing.assert_allclose(rows.epsilon.to_numpy(), direct["epsilon"].numpy())
    flipped = rows[rows.epsilon.notna()]
    assert len(flipped) and (flipped.linf <= flipped.epsilon + 1e-6).all()
    assert (flipped.adversarial_class != flipped.predicted).all()
    assert set(flipped.found_by) <= {"fgsm", "pgd"} and rows[rows.epsilon.isna()].found_by.isna().all()
    assert len(images) == 5 and images[rows.key[0]].size == (2 + 3 * (16 + 2), 2 + 16 + 2)  # three 16 px panels


def test_epsilons_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"\(0, 1\]"):
        Adversarial.Params(epsilons=[0.0, 0.1])
    with pytest.raises(ValidationError, match="at least one"):
        Adversarial.Params(epsilons=[])
