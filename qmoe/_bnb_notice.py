"""bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" line, and the one place qmoe
silences it (imported first by ``qmoe/__init__.py``, so before anything in qmoe imports bitsandbytes).

On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch an optional fused 4-bit CPU matmul from the
Hugging Face hub through the ``kernels`` package (not a dependency of qmoe; the hub may be unreachable) and logs a
WARNING when it cannot. Nothing is wrong then: bitsandbytes runs its own built-in bf16 4-bit kernel (and
``qmoe chat`` / ``qmoe eval --dequantize on`` skip 4-bit matmuls altogether, qmoe.inference). Only that
message is dropped; ``qmoe doctor`` reports which 4-bit CPU kernel is in use.
"""

from __future__ import annotations

import logging

NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _drop_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(NOTICE)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_notice)
