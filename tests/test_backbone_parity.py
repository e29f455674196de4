"""Cross-library parity: each medprobe backbone equals a second implementation of the same
architecture (fp32, max abs difference <= 1e-4) on perturbed random weights, at the native size
and other sizes. DINOv2 without registers off its native size is checked against the original
DINOv2 interpolation formula (bicubic, scale_factor=(n+0.1)/N, no antialias)."""
import pytest
import torch

from backbone_util import PARITY_CASES

TOL = 1e-4


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity(case, one_thread):
    diffs = PARITY_CASES[case]()
    assert diffs
    for size, (cls, patch) in diffs.items():
        assert cls <= TOL and patch <= TOL, f"{case} at {size} px: CLS {cls:.2e}, patches {patch:.2e}"


def test_original_formula_differs_from_timm_resampling(one_thread):
    """The oracle has power: timm's exact-size antialiased resampling is measurably different."""
    import timm
    from backbone_util import original_dinov2_pos_embed
    from timm.layers import resample_abs_pos_embed
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    ours = original_dinov2_pos_embed(pos, (16, 16))
    theirs = resample_abs_pos_embed(pos, [16, 16], [37, 37], num_prefix_tokens=1)
    assert (ours - theirs).abs().max() > 1e-2
    assert timm.__version__
