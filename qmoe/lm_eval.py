"""lm-evaluation-harness on a qmoe adapter: ``python -m qmoe.lm_eval`` is lm-eval's own command line with
qmoe's PEFT methods registered first, so lm-eval's PEFT route loads any qmoe adapter folder::

    python -m qmoe.lm_eval --model hf --model_args pretrained=BASE,peft=runs/x/adapter --tasks gsm8k

(lm-eval's ``hf`` model calls ``PeftModel.from_pretrained(base, peft)``, which needs the registration; a plain
``lm-eval`` command loads qmoe's ``lora`` folders, which are PEFT LoRA folders, but not the mixtures.)
Needs ``pip install lm-eval``.
"""

from __future__ import annotations


def main() -> None:
    from . import peft_integration  # noqa: F401  (registers MoELoRA, LoRACoE, LoRAMoE with PEFT)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit("lm-eval is not installed: pip install lm-eval") from None
    cli_evaluate()


if __name__ == "__main__":
    main()
