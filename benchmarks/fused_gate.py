"""The routing step alone (z -> gated rank activations, forward + backward): plain autograd reference vs the
autograd Function ('function', PyTorch math) vs the Triton kernel (CUDA), and the bytes each keeps for
backward (measured with saved-tensor hooks, so exact).

    python benchmarks/fused_gate.py [--device cpu|cuda] [--tokens 512 4096]
"""

from __future__ import annotations

import argparse

import torch

from qmoe.bench.timing import interleaved_medians
from qmoe.kernels import loracoe_gate, loracoe_gate_reference, moelora_gate, moelora_gate_reference, triton_available

CASES = {
    "moelora 8x4 top-2": (
        lambda z, b: moelora_gate(z, 8, 4, 2, b),
        lambda z: moelora_gate_reference(z, 8, 4, 2),
        8 + 32,
        32,
    ),
    "loracoe E=2 r=16": (
        lambda z, b: loracoe_gate(z, 2, 16, 16.0, b),
        lambda z: loracoe_gate_reference(z, 2, 16, 16.0),
        16 + 32,
        16,
    ),
}


def saved_bytes(fn, z) -> int:
    """Bytes of the tensors autograd keeps for backward (views of z count: they keep z alive)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(z)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    backends = ["function"] + (["triton"] if args.device == "cuda" and triton_available() else [])
    print("| case | tokens | impl | fwd+bwd | saved for backward |\n|---|---|---|---|---|")
    for name, (fused, reference, width, out_width) in CASES.items():
        for tokens in args.tokens:
            z = torch.randn(tokens, width, device=args.device, requires_grad=True)
            grad = torch.randn(tokens, out_width, device=args.device)
            impls = {"autograd": reference, **{b: (lambda z, b=b, fused=fused: fused(z, b)) for b in backends}}

            def run(impl, z=z, grad=grad):
                def go():
                    impl(z)[0].backward(grad)
                    z.grad = None

                return go

            medians = interleaved_medians({k: run(v) for k, v in impls.items()}, args.repeats, 3, args.device)
            for impl_name, impl in impls.items():
                kib = saved_bytes(impl, z) / 1024
                micros = medians[impl_name]["median_s"] * 1e6
                print(f"| {name} | {tokens} | {impl_name} | {micros:.0f} µs | {kib:.0f} KiB |")


if __name__ == "__main__":
    main()
