"""The one place where qmoe touches private APIs of transformers (and the inventory of all other libraries').

transformers' ``Trainer`` has no public hooks for what qmoe needs: checkpoints that hold only the adapter,
written into a staging folder and renamed (never the 4-bit backbone), a data order that continues across
LoRACoE stages, and a 4-bit model that Trainer accepts without PEFT. So qmoe overrides, calls and sets the
private names below, and only here: the rest of qmoe subclasses :class:`TrainerHooks` and implements its
public-named hooks, or calls the functions of this module. ``tests/test_hf_private.py`` checks every name
and signature listed here against the installed transformers and fails naming the attribute and the version;
``pyproject.toml`` pins transformers to the minor version that is tested.

Overridden (Trainer calls them; each forwards to a hook of :class:`TrainerHooks`):

``Trainer._get_train_sampler(train_dataset=None)``
    called by ``get_train_dataloader``; qmoe returns ``qmoe.sampling.DataStreamSampler`` so stage k continues
    the data order where stage k-1 stopped. If renamed: every stage restarts at the first shuffle
    (``tests/test_sampling.py`` fails).
``Trainer._save(output_dir=None, state_dict=None)``
    called by ``save_model``; qmoe writes the adapter only. If renamed: ``trainer.save_model()`` writes the
    whole 4-bit model.
``Trainer._save_checkpoint(model, trial)``
    called every ``save_steps`` and by our callback at the end of each stage and on SIGINT/SIGTERM; qmoe
    writes a complete adapter-only checkpoint (``qmoe.checkpoints.write_checkpoint``). If renamed: Trainer
    saves full-model checkpoints without the MoELoRA queues or the completeness marker, and resume fails.
``Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)``
    called by ``train(resume_from_checkpoint=...)``; qmoe loads the adapter and queues. If renamed: Trainer
    looks for full-model weights in the checkpoint and resume fails.

Called (Trainer's own writers of the resumable training state, exactly as its ``_save_checkpoint`` uses them):

``Trainer._save_optimizer_and_scheduler(output_dir)``, ``Trainer._save_scaler(output_dir)``,
``Trainer._save_rng_state(output_dir)``
    write ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` (mixed precision only) and ``rng_state.pth``,
    which ``train(resume_from_checkpoint=...)`` reads back. If renamed or their files renamed: checkpoints
    fail to save, or resume silently restarts the optimizer, schedule and random state.
the ``ExportableState`` bookkeeping in ``Trainer._save_checkpoint`` (``state.stateful_callbacks``)
    mirrored by :meth:`TrainerHooks.save_training_state` so callback states resume as Trainer's own would.

Set:

``PreTrainedModel._hf_peft_config_loaded = True``
    read by ``transformers.trainer_utils.validate_quantization_for_training``, which refuses to train a
    "purely quantized" model unless PEFT adapters are loaded; qmoe's adapters are not PEFT's. If renamed:
    ``Trainer(...)`` raises ValueError on every 4-bit model.
``Trainer.model_accepts_loss_kwargs = False``
    not underscored but undocumented state that ``Trainer.__init__`` sets from the model; False makes
    Trainer divide qmoe's per-micro-batch mean loss by the accumulation steps itself. If it stops being
    read: losses are scaled wrongly under gradient accumulation.
``transformers.trainer.DEFAULT_PROGRESS_CALLBACK`` (with the public ``ProgressCallback`` and
``PrinterCallback``)
    the printers ``Trainer.__init__`` adds; :func:`remove_log_printers` takes them out because
    ``qmoe.callbacks`` prints the bar and one line per logging step. If renamed: the import fails here.

Private names of other libraries, left where they are (listed so that this is the whole inventory; the test
checks them too):

``torch._C._current_graph_task_id()`` in ``qmoe/tuners/base.py``
    -1 outside autograd's backward: tells the layers that gradient checkpointing is recomputing a forward.
``PretrainedConfig._name_or_path`` in ``qmoe/serialization.py``
    the base model recorded in ``adapter_config.json`` (the public ``config.name_or_path`` reads the same).
argparse's ``ArgumentParser._subparsers`` in ``tests/test_ui.py`` (test code only).
bitsandbytes' C library functions ``gemv_4bit_inference_cpu_{nf4,fp4}_bf16``, ``QuantState.packing_format_for_cpu``,
``backends.cpu.ops.gemm_4bit_forward_kernel`` and ``functional._convert_weight_packed_for_cpu_inverse``
    all read in ``qmoe/kernels/bnb_cpu.py`` (its docstring says what each is for and what happens if it moves):
    qmoe calls bitsandbytes' 4-bit CPU kernel directly at inference, and undoes its CPU packing for dequantised
    copies.

PEFT (``qmoe.peft_integration`` registers MoELoRA, LoRACoE and LoRAMoE as PEFT methods):

``peft.utils.register_peft_method`` is PEFT's extension point, but it refuses any name that is not a member of
the closed enum ``peft.utils.PeftType``, so a method living outside PEFT cannot call it. :func:`register_peft_type`
writes the dicts it writes (``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``, ``PEFT_TYPE_TO_TUNER_MAPPING``
and ``PEFT_TYPE_TO_PREFIX_MAPPING``; the first two are exported by ``peft``), keyed by qmoe's own ``str`` enum,
which PEFT's lookups by the string in ``adapter_config.json`` find. If PEFT renames the dicts:
``PeftModel.from_pretrained`` raises ``KeyError: 'MOELORA'``. When ``register_peft_method`` accepts outside names
the test fails and says so: call it instead.
``BaseTuner._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)``
    a classmethod that ``set_peft_model_state_dict`` calls on the tuner class with the folder's tensors;
    :class:`PeftTunerHooks` forwards it to ``check_loaded_state`` so a folder missing some adapter tensors is an
    error (PEFT's own missing-key warning matches the adapter name in keys, which qmoe's keys do not carry).
    If renamed: a folder with missing tensors loads with those layers at their initial values, silently.
``BaseTuner._create_and_replace``
    abstract in ``BaseTuner``; qmoe wraps modules in the public ``inject_adapter`` instead, so it only raises.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from torch import nn
from torch.utils.data import Dataset, Sampler
from transformers import PrinterCallback, ProgressCallback, Trainer
from transformers.trainer_callback import ExportableState

TRANSFORMERS_VERSION = transformers.__version__

# the files Trainer's private state writers create and train(resume_from_checkpoint=...) reads back
TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")  # scaler.pt only with mixed precision
# with several processes (data parallel) ``_save_rng_state`` writes one file per process instead of rng_state.pth
RNG_STATE_FILE, RNG_STATE_PER_PROCESS = "rng_state.pth", "rng_state_{}.pth"


class TrainerHooks(Trainer):
    """``Trainer`` with its private extension points forwarded to public-named hooks a subclass implements:
    :meth:`train_sampler`, :meth:`save_model_files`, :meth:`save_checkpoint` and :meth:`load_checkpoint`;
    :meth:`save_training_state` writes Trainer's own resumable state into a folder."""

    # -- hooks (the subclass overrides these) -------------------------------------------------------------

    def train_sampler(self, dataset: Dataset) -> Sampler | None:
        """The training sampler, or None for Trainer's default."""
        return None

    def save_model_files(self, directory: Path) -> None:
        raise NotImplementedError

    def save_checkpoint(self) -> None:
        raise NotImplementedError

    def load_checkpoint(self, directory: Path, model: nn.Module) -> None:
        raise NotImplementedError

    # -- Trainer's private writers of the training state ----------------------------------------------------

    def save_training_state(self, directory: Path) -> None:
        """Optimizer, scheduler, scaler, RNG and trainer state into ``directory``, as ``_save_checkpoint``
        writes them (so ``train(resume_from_checkpoint=directory)`` restores them). Data parallel: called on
        every process (``store_flos`` is a collective, each process writes its own RNG state); the optimizer,
        scheduler, scaler and trainer state are written by the main process only (``args.should_save``)."""
        self.store_flos()
        self._save_optimizer_and_scheduler(str(directory))
        self._save_scaler(str(directory))
        self._save_rng_state(str(directory))
        # the ExportableState bookkeeping of Trainer._save_checkpoint, line for line
        for cb in [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()
        if self.args.should_save:
            self.state.save_to_json(str(directory / TRAINER_STATE_FILE))

    # -- the private overrides, forwarded -------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        sampler = self.train_sampler(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self.save_model_files(Path(output_dir or self.args.output_dir))

    def _save_checkpoint(self, model: nn.Module, trial: object) -> None:
        self.save_checkpoint()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self.load_checkpoint(Path(resume_from_checkpoint), model if model is not None else self.model)


def mark_adapters_attached(model: nn.Module) -> None:
    """Let Trainer train a 4-bit model that carries trainable qmoe adapters (see the module docstring)."""
    model._hf_peft_config_loaded = True


def mean_loss_per_micro_batch(trainer: Trainer) -> None:
    """compute_loss returns per-micro-batch means; Trainer then divides by the accumulation steps itself."""
    trainer.model_accepts_loss_kwargs = False


def remove_log_printers(trainer: Trainer) -> None:
    """Take out the progress bar / log printer Trainer adds (it prints every log as a dict)."""
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK

    for printer in {ProgressCallback, PrinterCallback, DEFAULT_PROGRESS_CALLBACK}:
        while trainer.pop_callback(printer) is not None:
            pass


# ---- PEFT -------------------------------------------------------------------------------------------------------
# (peft is already imported with transformers' Trainer, so importing it here costs nothing extra)
from peft.mapping import (  # noqa: E402
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import BaseTuner  # noqa: E402


def register_peft_type(peft_type: str, config_cls: type, tuner_cls: type, prefix: str) -> None:
    """What ``peft.utils.register_peft_method`` does, for a method outside PEFT's enum (see the docstring).

    Idempotent for the same classes; a different method already under the name is an error."""
    for mapping, value in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        (PEFT_TYPE_TO_TUNER_MAPPING, tuner_cls),
        (PEFT_TYPE_TO_PREFIX_MAPPING, prefix),
    ):
        current = mapping.get(peft_type)
        if current is not None and current != value:
            raise ValueError(f"PEFT already has a method {peft_type!r} ({current!r}); qmoe cannot register its own")
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls


class PeftTunerHooks(BaseTuner):
    """``BaseTuner`` with its private extension points forwarded to public-named hooks a subclass implements:
    :meth:`check_loaded_state` (tensors read from a folder, before they are loaded)."""

    @classmethod
    def check_loaded_state(cls, model: nn.Module, state_dict: dict) -> None:
        """Raise when ``state_dict`` (keys as the model names them) does not cover the model's adapter."""

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise AssertionError("qmoe tuners wrap modules in inject_adapter; _create_and_replace is never called")

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        cls.check_loaded_state(model, state_dict)
        return state_dict
