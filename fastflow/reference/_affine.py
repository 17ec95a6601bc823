"""Reference of the per-sample affine family (DESIGN.md section 1)."""
import torch


def affine(inputs, coeffs, dtype=None):
    """``out[m] = sum_k coeffs[:, m, k] * inputs[k]`` per group, in the math type of `coeffs`.

    inputs: K tensors of one element count (any float types), viewed as [G, n] with
    G = coeffs.shape[0]. coeffs: [G, M, K]. Returns M tensors shaped like inputs[0], in `dtype`
    (by default that of inputs[0]). The sum runs over k in order, with a separate multiply and
    add per term, as eager PyTorch would write it.
    """
    groups, num_out, num_in = coeffs.shape
    flat = [_per_group(x, groups).to(coeffs.dtype) for x in inputs]
    outputs = []
    for m in range(num_out):
        acc = coeffs[:, m, 0:1] * flat[0]
        for k in range(1, num_in):
            acc = acc + coeffs[:, m, k:k + 1] * flat[k]
        outputs.append(acc.to(dtype or inputs[0].dtype).reshape(inputs[0].shape))
    return outputs


def affine_dot(a, b, groups):
    """Per-group dot products ``dot[g, m, k] = sum_i a[m][g, i] * b[k][g, i]`` in fp64, returned
    in the math type of the inputs (fp32, or fp64 for fp64)."""
    math = torch.float64 if a[0].dtype == torch.float64 else torch.float32
    fa = torch.stack([_per_group(x, groups).double() for x in a], dim=1)  # [G, M, n]
    fb = torch.stack([_per_group(x, groups).double() for x in b], dim=1)  # [G, K, n]
    return torch.bmm(fa, fb.transpose(1, 2)).to(math)


def affine_sqnorm(inputs, coeffs):
    """Per-group ``sum_i r[g, i]**2`` of the single output r of ``affine(inputs, coeffs)``
    (coeffs [G, 1, K]), with r rounded to the math type and the squares summed in fp64."""
    (residual,) = affine([x.to(coeffs.dtype) for x in inputs], coeffs)
    return _per_group(residual, coeffs.shape[0]).double().pow(2).sum(dim=1).to(coeffs.dtype)


def _per_group(x, groups):
    """x viewed as [groups, n]; an empty batch has no groups."""
    return x.reshape(groups, x.numel() // groups if groups else 0)
