"""fastbn.conventions: what both implementations and the kernels agree on."""

from __future__ import annotations

import pytest
import torch

from fastbn import conventions, reference


def test_kernel_activation_codes_are_the_conventions():
    from fastbn.kernels import activations

    kernel_codes = {name: getattr(activations, name.upper()).value
                    for name in conventions.ACTIVATION_CODES}
    assert kernel_codes == conventions.ACTIVATION_CODES


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 9), (2, 3, 4, 5), (2, 3, 1, 2, 3)])
def test_mask_shape_holds_every_bit_that_pack_bits_packs(shape):
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = reference.pack_bits(bits)
    assert tuple(packed.shape) == conventions.mask_shape(bits)
    assert torch.equal(reference.unpack_bits(packed, bits), bits)


def test_counts_and_unbiasing_factor():
    x = torch.zeros(4, 3, 5, 2)
    assert conventions.reduced_count(x) == 40
    assert conventions.reduced_count(torch.zeros(4, 0, 5)) == 0
    assert conventions.unbiasing_factor(40) == 40 / 39
    assert conventions.unbiasing_factor(1) == 1.0
